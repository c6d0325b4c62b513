# The baseline trained with RVT's mixed sampling: every batch of 2 holds one random-access clip (5
# representations ending at a labelled frame, from a zero state) and one segment of a recording that
# is streamed from batch to batch, its LSTM states carried (detached) by RecurrentYOLOX, as RVT trains
# (RVT's sampling "mixed", weights 1:1). Evaluation streams as in the baseline.
#
#   python tools/train.py projects/RVT/configs/maxvit_yolox_patch4_3scale_mixed.py
_base_ = ["./maxvit_yolox_patch4_3scale_baseline.py"]
experiment = dict(
    name="RVT-B on eTraM with RVT's mixed sampling (patch 4, 3 scales, 100k)",
    hypothesis=(
        "Training on streamed recordings besides random clips, as RVT does, gives the LSTM states memory "
        "beyond one clip and raises streaming AP over the random-clip baseline."
    ),
)
train_clips = dict(
    type="RVTEventDataset",
    data_root={{_base_.data_root}},
    metainfo=dict(classes={{_base_.classes}}),
    sequence_length={{_base_.sequence_length}},
    pipeline=[dict(type="PackEventClip")],
    split="train",
    test_mode=False,
)
train_dataloader = dict(
    batch_size=2,  # random_per_batch + streams
    sampler=dict(_delete_=True, type="RVTMixedSampler", random_per_batch=1, streams=1),
    dataset=dict(_delete_=True, type="ConcatDataset", datasets=[train_clips, dict(train_clips, sampling="streaming")]),
)
