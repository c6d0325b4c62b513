# Ablation, grouping attention: dense in every block (the package's DenseSpatialGroupingAttention,
# computed in chunks: ChunkedDenseSpatialGroupingAttention).
# Memory: no groups x pixels matrix is held (the package's layer would hold 16384 x 65536 per head
# in block 0 at 256x256); peak memory per config: benchmarks/bench_rat_memory.py.
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(attention="dense"))
