# Ablation, positional encoding: RoSE with learnable frequencies and learnable spacing scale
# (the package's default, = the base config; written out so the table has its row).
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(learnable_rose=True, learnable_rose_scaling=True, rose_initial_scaling="log"))
