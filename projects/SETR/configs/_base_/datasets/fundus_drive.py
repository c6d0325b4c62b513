# DRIVE in mmseg's layout at <dataset root>/fundus/drive_mmseg (images/{training,validation}/NN.png,
# annotations/.../NN_manual1.png, labels 0/1). The dataset root is $RAT_DATASETS, else ./datasets.
# Create it from raw DRIVE with tools/convert_drive.py, or a synthetic stand-in with
# `python -m rat_plugins.data.synthetic fundus --out datasets/fundus/drive_mmseg --layout mmseg`.
dataset_type = 'DRIVEDataset'
data_root = '{{$RAT_DATASETS:datasets}}/fundus/drive_mmseg'
crop_size = (224, 224)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    # scaling: the whole image resized to crop_size times a random factor, then cropped / padded
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=False),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=1.0),
    dict(type='RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
    dict(type='RandomRotate', prob=0.5, degree=20, pad_val=0, seg_pad_val=255),
    dict(type='PackSegInputs'),
]
# Validation: resize + (in the data preprocessor) normalise; scored at the annotation's own size.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=False),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='VesselMetric', foreground_index=1, iou_metrics=['mIoU', 'mDice'])
test_evaluator = val_evaluator
