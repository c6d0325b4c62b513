# Ablation, grouping attention: dense in every block (the package's DenseSpatialGroupingAttention).
# Memory: block 0 at 256x256 holds a 16384 x 65536 matrix per head (x 8 heads, x 2 for attn_q/attn_k,
# plus gradients): beyond one 80 GB GPU at this size; run it at a smaller crop_size.
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(attention="dense"))
