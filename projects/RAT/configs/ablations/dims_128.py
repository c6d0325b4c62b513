# Ablation, feature dims: 128 (= the base config; written out so the table has its row).
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(feature_dims=128), decode_head=dict(in_channels=[128] * 12))
