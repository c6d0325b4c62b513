# Ablation, grouping attention: standard multi-head attention. The package has none; the plugin's
# RATAblation (rat_plugins/mm/isic.py) swaps every grouping layer for StandardMHAGrouping: the same
# layer and weights with softmax over keys only (no renormalisation over queries, so groups do not
# compete for pixels). Dense: the same memory caveat as attn_dense.py.
_base_ = ['../rat_isic_triple_256-128-64.py']
model = dict(backbone=dict(type='RATAblation', attention='mha'))
