# RAT, one scale (256x256), UPerHead on its 4 maps (strides 2, 4, 8, 16); ISIC 2018 lesions.
_base_ = [
    "_base_/models/rat_uper.py",
    "_base_/datasets/isic2018.py",
    "../../_base_/schedules/mmseg_adamw_cosine_20k.py",
    "../../_base_/mmseg_runtime.py",
]
model = dict(backbone=dict(scales=(1.0,)), decode_head=dict(in_channels=[128] * 4, in_index=(0, 1, 2, 3)))
