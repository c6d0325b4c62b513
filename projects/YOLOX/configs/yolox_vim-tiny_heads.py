# Head detection on mmdet: frozen ViM-tiny (stride 16) -> 1x1 channel mapper -> YOLOX head
# (SimOTA assignment), on the Roboflow export at <dataset root>/coco.
_base_ = ["../../_base_/mmdet_runtime.py"]

data_root = "{{$RAT_DATASETS:datasets}}/coco/"  # RAT_DATASETS as in datasets/README.md
image_size = 640
classes = ("head",)

model = dict(
    type="YOLOX",
    data_preprocessor=dict(
        type="DetDataPreprocessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=16,
    ),
    backbone=dict(type="ViM", embed_dim=192, depth=24, frozen=True, checkpoint="ckpts/vim_tiny_pretrained.pth"),
    neck=dict(
        type="ChannelMapper",
        in_channels=[192],
        out_channels=128,
        kernel_size=1,
        norm_cfg=dict(type="GN", num_groups=32),
        num_outs=1,
    ),
    bbox_head=dict(
        type="YOLOXHead",
        num_classes=len(classes),
        in_channels=128,
        feat_channels=128,
        stacked_convs=2,
        strides=(16,),
        norm_cfg=dict(type="GN", num_groups=32),
    ),
    train_cfg=dict(assigner=dict(type="SimOTAAssigner", center_radius=2.5)),
    test_cfg=dict(score_thr=0.01, nms=dict(type="nms", iou_threshold=0.65)),
)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
# one dataset entry per split: the export's <split>/ folder; evaluation splits keep images without heads
heads_dataset = dict(type="RoboflowCocoDataset", data_root=data_root, metainfo=dict(classes=classes))
eval_loader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
)
train_dataloader = dict(
    batch_size=8,
    num_workers=2,
    persistent_workers=False,
    sampler=dict(type="DefaultSampler", shuffle=True),
    batch_sampler=dict(type="AspectRatioBatchSampler"),
    dataset=dict(
        heads_dataset,
        ann_file="train/_annotations.coco.json",
        data_prefix=dict(img="train/"),
        filter_cfg=dict(filter_empty_gt=True, min_size=1),
        pipeline=train_pipeline,
        test_mode=False,
    ),
)
val_dataloader = dict(
    eval_loader,
    dataset=dict(
        heads_dataset,
        ann_file="valid/_annotations.coco.json",
        data_prefix=dict(img="valid/"),
        filter_cfg=dict(filter_empty_gt=False, min_size=1),
        pipeline=test_pipeline,
        test_mode=True,
    ),
)
test_dataloader = dict(
    eval_loader,
    dataset=dict(
        heads_dataset,
        ann_file="test/_annotations.coco.json",
        data_prefix=dict(img="test/"),
        filter_cfg=dict(filter_empty_gt=False, min_size=1),
        pipeline=test_pipeline,
        test_mode=True,
    ),
)
val_evaluator = dict(
    type="CocoMetric", ann_file=data_root + "valid/_annotations.coco_filtered.json", metric="bbox", format_only=False
)
test_evaluator = dict(
    type="CocoMetric", ann_file=data_root + "test/_annotations.coco_filtered.json", metric="bbox", format_only=False
)

train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=100, val_interval=1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type="MultiStepLR", by_epoch=True, milestones=[70, 90], gamma=0.1),
]
default_hooks = dict(
    logger=dict(interval=20), checkpoint=dict(interval=1, save_best="coco/bbox_mAP_50", rule="greater")
)
log_processor = dict(window_size=20)
