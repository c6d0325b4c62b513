# Ablation, positional encoding: absolute. The package has no absolute encoding: this uses the
# plugin's RATAblation (rat_plugins/mm/isic.py): a fixed 2D sine-cosine embedding of each token's
# centre (normalised image coordinate x 256) added after the input projection of every level;
# rotary encoding off (rotary_ratio=0.0).
_base_ = ['../rat_isic_triple_256-128-64.py']
model = dict(backbone=dict(type='RATAblation', pos_embed='absolute', abs_ref_size=256, rotary_ratio=0.0))
