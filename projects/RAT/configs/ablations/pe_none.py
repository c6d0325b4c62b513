# Ablation, positional encoding: none (the package's rotary_ratio=0.0: no channel is rotated in any
# grouping or multi-resolution attention layer).
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(rotary_ratio=0.0))
