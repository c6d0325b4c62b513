# Ablation, grouping attention: standard multi-head attention. The package has none; RATBackbone's
# attention='mha' makes every grouping layer a StandardMHAGrouping (rat_plugins/models/rat_ablations.py):
# the same layer and weights with softmax over keys only (no renormalisation over queries, so groups
# do not compete for pixels). Dense: the same memory caveat as attn_dense.py.
_base_ = ["../rat_isic_triple_256-128-64.py"]
model = dict(backbone=dict(attention="mha"))
