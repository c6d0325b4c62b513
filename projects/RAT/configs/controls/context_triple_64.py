# Positive control of the RAT study, three scales (64 + 32 + 16 from one 64x64 image): the single-scale
# control (context_single_64.py) with two coarse levels. Their windows cover 2x and 4x the ground, so
# their maps see the whole image, the dark surround included; the decoder reads all three maps, as
# the study's decoders read every pyramid level. (Read only through level 0's attention, the
# surround took 100-300 iterations to be used, and some seeds had not used it after 200.)
_base_ = ["context_single_64.py"]
model = dict(
    backbone=dict(scales=(1.0, 0.5, 0.25)),
    # maps by stride: level 0 (2), level 1 (4), level 2 (8)
    decode_head=dict(in_channels=[{{_base_.width}}] * 3, in_index=(0, 1, 2), feature_strides=[2, 4, 8]),
)
