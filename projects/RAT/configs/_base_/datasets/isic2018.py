# ISIC 2018 Task 1 (lesion segmentation) in its original layout at <dataset root>/isic2018
# (docs/formats.md, "ISIC 2018 Task 1"); masks 0/255 become classes 0/1 through the dataset's label map.
# The dataset root is $RAT_DATASETS, else ./datasets. A synthetic stand-in:
# `python -m rat_plugins.data.synthetic isic --out datasets/isic2018`.
# One image per sample: the RAT backbone builds the 256/128/64 pyramid from it (model.backbone.scales),
# so the pipeline only resizes and flips; the data preprocessor normalises.
dataset_type = 'ISIC2018Dataset'
data_root = '{{$RAT_DATASETS:datasets}}/isic2018'
crop_size = (256, 256)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='Resize', scale=crop_size, keep_ratio=False),
    dict(type='RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
    dict(type='PackSegInputs'),
]
# Validation / test: the image resized to crop_size; the mask kept at its own size (scored there).
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=False),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type=dataset_type, data_root=data_root, split='Training', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='Validation', pipeline=test_pipeline))
test_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type=dataset_type, data_root=data_root, split='Test', pipeline=test_pipeline))
# Dice, IoU, accuracy, sensitivity, specificity of the lesion class (percent), plus mIoU / mDice.
val_evaluator = dict(type='LesionMetric', foreground_index=1, iou_metrics=['mIoU', 'mDice'])
test_evaluator = val_evaluator
