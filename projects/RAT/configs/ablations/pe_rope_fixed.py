# Ablation, positional encoding: fixed rotary encoding (RoPE): frequencies and spacing scale frozen
# (the package's learnable_rose=False, learnable_rose_scaling=False). Positions are pixel index x
# level spacing (identity scaling), so pyramid levels share one frame; for one level at spacing 1
# this is plain RoPE. NOT rose_initial_scaling='rope': in the installed RoSE that sets a=b=c=0 and,
# with a fixed scale, multiplies every position by 0 - no positional information at all.
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(learnable_rose=False, learnable_rose_scaling=False, rose_initial_scaling="identity"))
