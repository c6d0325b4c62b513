# Ablation, depth: 4 blocks (= the base config; written out so the table has its row).
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(num_blocks=4), decode_head=dict(in_channels=[128] * 12, in_index=tuple(range(12))))
