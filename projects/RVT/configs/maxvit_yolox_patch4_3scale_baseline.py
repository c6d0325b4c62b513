# RVT baseline on eTraM, on mmdet: MaxViT-RNN (base size, stem patch 4) -> 3-level YOLOX PAFPN on
# stages 2-4 (strides 8/16/32) -> mmdet's YOLOX head, 100k iterations. Clips of 5 event histograms
# ending at a labelled frame, loss on that frame. Data: RVT's preprocessed layout under
# <dataset root>/events/etram (RAT_DATASETS, as in datasets/README.md).
#
#   python tools/train.py projects/RVT/configs/maxvit_yolox_patch4_3scale_baseline.py
# One-line overrides (--cfg-options ...):
#   mixed precision (RVT trains with precision 16):  optim_wrapper.type=AmpOptimWrapper   (or --amp)
#   the fallback when batch 2 does not fit:          train_dataloader.batch_size=1 optim_wrapper.accumulative_counts=2
#     (the schedule counts iterations, i.e. batches of 1: double train_cfg.max_iters and param_scheduler.0.end
#      to keep the number of samples seen)
#   linear lr scaling from RVT's batch 12:           auto_scale_lr.enable=True
#   fine-tune from a whole RVT checkpoint:           model.load_from_rvt=rvt-b.ckpt
# An official RVT checkpoint evaluates here after one conversion (README, "eTraM"):
#   python tools/convert_rvt_checkpoint.py rvt-b.ckpt rvt-b_mmdet.pth --config THIS_CONFIG
#   python tools/test.py THIS_CONFIG rvt-b_mmdet.pth
_base_ = ["../../_base_/mmdet_runtime.py"]
# What this run is for; tools/experiment_record.py writes the experiment record from these fields
# and from the config itself (python tools/experiment_record.py CONFIG --baseline BASE).
experiment = dict(
    name="RVT-B baseline on eTraM (patch 4, 3 scales, 100k)",
    hypothesis=(
        "RVT-B (MaxViT-RNN, stem patch 4, PAFPN on stages 2-4, YOLOX head) reimplemented on mmdet "
        "trains stably on eTraM and gives the reference COCO AP / AP_small / per-class AP that the "
        "small-object variants are compared against."
    ),
    success_criteria=[
        "training reaches 100k iterations with finite losses (no NaN / inf after the 0.5 % warm-up)",
        "coco/bbox_mAP on eTraM val rises over the 10 evaluations and the best checkpoint is kept",
        "the best checkpoint gives AP, AP50, AP_small / medium / large and per-class AP for all 8 classes",
    ],
    failure_criteria=[
        "losses diverge or stay flat after the warm-up",
        "coco/bbox_mAP at 100k is not above its value at 10k",
    ],
    gpus=1,
)

data_root = "{{$RAT_DATASETS:datasets}}/events/etram/"
# eTraM's class ids (eTraM repository, rvt_eTram/gen4_class_labels.py)
classes = ("pedestrian", "car", "bicycle", "bus", "motorbike", "truck", "tram", "wheelchair")
sequence_length = 5  # RVT gen4 (1 Mpx) experiment: 5 representations of 50 ms per clip
max_iters = 100_000
val_interval = 10_000  # RVT gen4: val_check_interval 10000

model = dict(
    type="RecurrentYOLOX",
    # pads bottom / right to the backbone's multiple (64 here: stride 32 x partition_split 2); counts stay raw
    data_preprocessor=dict(type="EventClipDataPreprocessor"),
    backbone=dict(
        type="MaxViTRNN", variant="base", in_chans=20, patch_size=4, partition_split=2, out_indices=(1, 2, 3)
    ),  # RVT in_stages [2, 3, 4]
    # RVT's head width int(256 * 512 / 1024) = 128; out_convs are RVT's head stems
    neck=dict(type="RVTPAFPN", in_channels=[128, 256, 512], depth=0.67, act="silu", out_channels=128),
    bbox_head=dict(
        type="YOLOXHead",
        num_classes=len(classes),
        in_channels=128,
        feat_channels=128,
        stacked_convs=2,
        strides=(8, 16, 32),
        norm_cfg=dict(type="BN", momentum=0.1, eps=1e-5),  # RVT's batch norms keep PyTorch's defaults
    ),
    # RVT's SimOTA candidates: priors within 1.5 strides of a box centre (mmdet's stock SimOTAAssigner
    # also takes priors inside the box and within 2.5 strides)
    train_cfg=dict(assigner=dict(type="RVTSimOTAAssigner")),
    # RVT's postprocess: confidence 0.1, NMS IoU 0.45
    test_cfg=dict(score_thr=0.1, nms=dict(type="nms", iou_threshold=0.45)),
)
# one dataset entry per split (train / val / test folders of the preprocessed layout)
event_clips = dict(
    type="RVTEventDataset",
    data_root=data_root,
    metainfo=dict(classes=classes),
    sequence_length=sequence_length,
    pipeline=[dict(type="PackEventClip")],
)
# Evaluation as RVT's: each recording streamed from its first representation with the LSTM states
# carried (segments between labelled frames, two recordings side by side), scored at the labelled
# frames after RVT's box filtering. The fast option, zero-state clips of sequence_length ending at each
# labelled frame (not comparable with RVT's numbers):
#   --cfg-options val_dataloader.dataset.sampling=random val_dataloader.sampler.type=DefaultSampler
#   (likewise test_dataloader; streaming runs in one process, random clips in any number)
eval_loader = dict(
    batch_size=2,
    num_workers=3,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type="RVTStreamingSampler", streams=2),
)
train_dataloader = dict(
    batch_size=2,
    num_workers=4,
    persistent_workers=False,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(event_clips, split="train", test_mode=False),
)
val_dataloader = dict(eval_loader, dataset=dict(event_clips, split="val", test_mode=True, sampling="streaming"))
test_dataloader = dict(eval_loader, dataset=dict(event_clips, split="test", test_mode=True, sampling="streaming"))
# COCO ground truth from the data samples (boxes in ds2 histogram pixels); AP_s/m/l and per-class AP.
# RVT's filtering first: nothing of a recording's first 0.5 s, no box with a diagonal under 30 or a side
# under 10 (eTraM's 1280x720 sensor, halved by the ds2 input; RVT's gen4 values 60 / 20).
val_evaluator = dict(
    type="RVTCocoMetric",
    camera="etram",
    downsampled_by_2=True,
    ann_file=None,
    metric="bbox",
    classwise=True,
    format_only=False,
)
test_evaluator = val_evaluator

train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=val_interval)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")

# RVT's optimiser and schedule (uzh-rpg/RVT modules/detection.py configure_optimizers, config/general.yaml,
# config/experiment/gen4/default.yaml): AdamW without weight decay, gradients clipped by value at 1.0,
# max lr 3.46e-4 (tuned for batch 12), one cycle with linear annealing, 0.5 % warm-up from max / 20,
# no momentum cycling, ending at max / 10000 (PyTorch's final_div_factor divides the initial lr:
# 10000 / 20 = 500).
lr = 3.46e-4
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=lr, weight_decay=0.0),
    clip_grad=dict(type="value", clip_value=1.0),
)
param_scheduler = [
    dict(
        type="OneCycleLR",
        eta_max=lr,
        pct_start=0.005,
        div_factor=20,
        final_div_factor=500,
        anneal_strategy="linear",
        by_epoch=False,
        begin=0,
        end=max_iters,
    ),
]
auto_scale_lr = dict(enable=False, base_batch_size=12)

default_hooks = dict(checkpoint=dict(by_epoch=False, interval=val_interval, save_best="coco/bbox_mAP", rule="greater"))
log_processor = dict(by_epoch=False)
