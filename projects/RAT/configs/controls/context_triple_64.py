# Positive control of the RAT study, three scales (96 + 48 + 24 from one 96x96 image): the single-scale
# control (context_single_96.py) with two coarse levels. Their windows cover 2x and 4x the ground, so
# level 0's outputs see about 40 pixels each side through them, the ring included; the decoder reads
# the level-0 map as before (by-stride order puts it first). Expected: clearly above the single scale.
_base_ = ["context_single_96.py"]
model = dict(backbone=dict(scales=(1.0, 0.5, 0.25)))
