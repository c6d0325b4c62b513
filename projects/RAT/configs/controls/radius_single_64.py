# Positive control of the RAT study, physical units: the radius task (data: `python -m
# rat_plugins.data.synthetic isic-radius --out datasets/isic2018`; the mask is the disc of radius 16
# pixels at 64x64 around a dark marker on plain skin). Grouping and convolutions are local (kernels
# 3, grouping windows of 3 tokens, per-token heads), so the disc's edge is reachable only through
# the global multi-resolution attention, whose RoSE positions are index x spacing. RoSE's spacing
# transform is the identity here and fixed: the study's default ("log", learnable: a * s ** b +
# c * log(s / d), which starts at 0 for s = 1) does not keep distances physical when the spacing
# changes. Tested at 128x128 with the spacing halved, the disc keeps its physical size; without the
# scaling the model draws it too small. Run by tools/run_rat_controls.py.
_base_ = ["context_single_64.py"]
width = 32
model = dict(
    backbone=dict(feature_dims=width, mr_window=None, rose_initial_scaling="identity", learnable_rose_scaling=False),
    decode_head=dict(in_channels=[width], channels=width),
)
optim_wrapper = dict(optimizer=dict(lr=3e-3))
