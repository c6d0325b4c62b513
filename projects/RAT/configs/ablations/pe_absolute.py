# Ablation, positional encoding: absolute. The package has no absolute encoding: RATBackbone's
# pos_embed='absolute' adds a fixed 2D sine-cosine embedding of each token's centre (normalised image
# coordinate x abs_ref_size) after the input projection of every level; rotary encoding off
# (rotary_ratio=0.0).
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(pos_embed="absolute", abs_ref_size=256, rotary_ratio=0.0))
