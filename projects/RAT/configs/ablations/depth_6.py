# Ablation, depth: 6 blocks (maps: 18, strides 2..256).
_base_ = ['../rat_isic_triple_256-128-64.py']
model = dict(
    backbone=dict(num_blocks=6, out_indices=(0, 1, 6, 2, 7, 12, 3, 8, 13, 4, 9, 14, 5, 10, 15, 11, 16, 17)),
    decode_head=dict(in_channels=[128] * 18, in_index=tuple(range(18))))
