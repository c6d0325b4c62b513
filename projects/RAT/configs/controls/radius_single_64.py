# Positive control of the RAT study, physical units: the radius task (data: `python -m
# rat_plugins.data.synthetic isic-radius --out datasets/isic2018`; the mask is the disc of radius 16
# pixels at 64x64 around a small marker). Grouping and convolutions are local (kernels 3, grouping
# windows of 3 tokens, per-token heads: about 12 pixels each side with the decoder), so the disc's
# edge is reachable only through the multi-resolution attention, whose RoSE positions are physical
# (index x spacing). Tested at 128x128 with the spacing halved, the disc keeps its physical size;
# without the scaling the model draws it too small. Run by tools/run_rat_controls.py.
_base_ = ["context_single_96.py"]
model = dict(data_preprocessor=dict(size=(64, 64)), backbone=dict(mr_window=None))
