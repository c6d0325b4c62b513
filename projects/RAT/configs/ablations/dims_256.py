# Ablation, feature dims: 256 (8 heads of 32).
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(feature_dims=256), decode_head=dict(in_channels=[256] * 12))
