# Ablation, grouping attention: mixed - local in the first ceil(num_blocks / 2) blocks, dense after
# (= the base config; written out so the table has its row).
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(attention="mixed"))
