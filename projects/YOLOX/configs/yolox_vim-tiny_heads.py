# Head detection on mmdet: frozen ViM-tiny (stride 16) -> 1x1 channel mapper -> YOLOX head
# (SimOTA assignment), on the Roboflow export at <dataset root>/coco.
custom_imports = dict(imports=['rat_plugins.mm'], allow_failed_imports=False)
default_scope = 'mmdet'

data_root = '{{$RAT_DATASETS:datasets}}/coco/'  # RAT_DATASETS as in datasets/README.md
image_size = 640
classes = ('head', )

model = dict(
    type='YOLOX',
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=16),
    backbone=dict(type='ViM', embed_dim=192, depth=24, freeze=True,
                  checkpoint='ckpts/vim_tiny_pretrained.pth'),
    neck=dict(type='ChannelMapper', in_channels=[192], out_channels=128, kernel_size=1,
              norm_cfg=dict(type='GN', num_groups=32), num_outs=1),
    bbox_head=dict(type='YOLOXHead', num_classes=len(classes), in_channels=128, feat_channels=128,
                   stacked_convs=2, strides=(16, ), norm_cfg=dict(type='GN', num_groups=32)),
    train_cfg=dict(assigner=dict(type='SimOTAAssigner', center_radius=2.5)),
    test_cfg=dict(score_thr=0.01, nms=dict(type='nms', iou_threshold=0.65)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]


def _split(name, pipeline, test_mode):
    return dict(type='RoboflowCocoDataset', data_root=data_root, metainfo=dict(classes=classes),
                ann_file=f'{name}/_annotations.coco.json', data_prefix=dict(img=f'{name}/'),
                filter_cfg=dict(filter_empty_gt=not test_mode, min_size=1), pipeline=pipeline,
                test_mode=test_mode)


train_dataloader = dict(batch_size=8, num_workers=2, persistent_workers=False,
                        sampler=dict(type='DefaultSampler', shuffle=True),
                        batch_sampler=dict(type='AspectRatioBatchSampler'),
                        dataset=_split('train', train_pipeline, False))
val_dataloader = dict(batch_size=1, num_workers=2, persistent_workers=False, drop_last=False,
                      sampler=dict(type='DefaultSampler', shuffle=False),
                      dataset=_split('valid', test_pipeline, True))
test_dataloader = dict(batch_size=1, num_workers=2, persistent_workers=False, drop_last=False,
                       sampler=dict(type='DefaultSampler', shuffle=False),
                       dataset=_split('test', test_pipeline, True))
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'valid/_annotations.coco_filtered.json',
                     metric='bbox', format_only=False)
test_evaluator = dict(type='CocoMetric', ann_file=data_root + 'test/_annotations.coco_filtered.json',
                      metric='bbox', format_only=False)

train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=100, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1),
                     paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', by_epoch=True, milestones=[70, 90], gamma=0.1),
]
default_hooks = dict(
    timer=dict(type='IterTimerHook'), logger=dict(type='LoggerHook', interval=20),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3, save_best='coco/bbox_mAP_50', rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'), visualization=dict(type='DetVisualizationHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=20, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
