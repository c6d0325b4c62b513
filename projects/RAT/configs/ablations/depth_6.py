# Ablation, depth: 6 blocks (maps: 18, strides 2..256).
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(num_blocks=6), decode_head=dict(in_channels=[128] * 18, in_index=tuple(range(18))))
