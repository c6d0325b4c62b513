# The small-object experiment against maxvit_yolox_patch4_3scale_baseline.py: stem patch 2 (strides
# 2/4/8/16), all four stages in the PAFPN (in_stages [1, 2, 3, 4]), the size-aware YOLOX loss
# (exponential, weight 2.0 for areas up to 1024 px², 1 from 9216 px²), 200k iterations. Batch sizes
# (train / eval 2, workers 4 / 3), data, optimiser and the one-line overrides (mixed precision,
# batch 1 + 2-step accumulation) are the baseline's; the schedule is stretched to 200k.
_base_ = ['./maxvit_yolox_patch4_3scale_baseline.py']

max_iters = 200_000

model = dict(
    # pad multiple 32 (stride 16 x partition_split 2), taken from the backbone
    backbone=dict(patch_size=2, out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=[64, 128, 256, 512]),
    bbox_head=dict(type='SizeAwareYOLOXHead', strides=(2, 4, 8, 16), size_aware_weight=2.0,
                   small_threshold=1024, medium_threshold=9216, weight_type='exponential'))

train_cfg = dict(max_iters=max_iters)
param_scheduler = [
    dict(type='OneCycleLR', eta_max={{_base_.lr}}, pct_start=0.005, div_factor=20, final_div_factor=500,
         anneal_strategy='linear', by_epoch=False, begin=0, end=max_iters),
]
