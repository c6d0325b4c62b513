# Ablation, depth: 2 blocks (maps: 6, strides 2..16).
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(num_blocks=2), decode_head=dict(in_channels=[128] * 6, in_index=tuple(range(6))))
