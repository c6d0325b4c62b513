# Ablation, grouping attention: sparse in every block - each group attends to its local window of
# input tokens. The package's sparse layer needs NATTEN (CUDA only); this is
# LocalSpatialGroupingAttention (same weights, same neighbourhood semantics, CPU and CUDA).
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(attention="sparse"))
