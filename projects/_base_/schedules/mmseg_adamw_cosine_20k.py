# AdamW, lr 1e-4, cosine annealing over the whole run; validation and checkpoints by iteration.
# Changing train_cfg.max_iters? Set param_scheduler.0.end (and T_max follows) to the same value.
max_iters = 20000
val_interval = 1000
optim_wrapper = dict(
    type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01), clip_grad=None
)
param_scheduler = [
    dict(type="CosineAnnealingLR", eta_min=1e-6, by_epoch=False, begin=0, end=max_iters),
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=val_interval)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type="ParamSchedulerHook"),
    # periodic checkpoints (the last 3 kept), the best by validation Dice, and the final one
    checkpoint=dict(
        type="CheckpointHook",
        by_epoch=False,
        interval=2000,
        max_keep_ckpts=3,
        save_best="Dice",
        rule="greater",
        save_last=True,
    ),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="SegVisualizationHook"),
)
