# RAT, three scales (256 + 128 + 64 built from one 256x256 image), UPerHead on all 12 maps by
# stride (level 0: strides 2..16, level 1: 4..32, level 2: 8..64). The base of the ablations.
_base_ = [
    "_base_/models/rat_uper.py",
    "_base_/datasets/isic2018.py",
    "../../_base_/schedules/mmseg_adamw_cosine_20k.py",
    "../../_base_/mmseg_runtime.py",
]
model = dict(
    backbone=dict(scales=(1.0, 0.5, 0.25)), decode_head=dict(in_channels=[128] * 12, in_index=tuple(range(12)))
)
