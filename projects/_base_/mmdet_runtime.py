# mmdet runtime shared by the YOLOX and RVT configs: plugin import, mmdet scope, hooks, logging to
# text + TensorBoard. Configs set the logger / checkpoint intervals and the log processor's window.
custom_imports = dict(imports=["rat_plugins.mm"], allow_failed_imports=False)
default_scope = "mmdet"
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", interval=1, max_keep_ckpts=3),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="DetVisualizationHook"),
)
env_cfg = dict(
    cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0), dist_cfg=dict(backend="nccl")
)  # tools/train.py switches to gloo on machines without CUDA
vis_backends = [dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")]
visualizer = dict(type="DetLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(type="LogProcessor", window_size=50, by_epoch=True)
log_level = "INFO"
load_from = None
resume = False
# a fixed seed unless the config sets one (tools/train.py records it and the deterministic settings in
# <work_dir>/run_config.json); deterministic=True trades speed for bit-identical repeats on GPU
randomness = dict(seed=0, deterministic=False)
# early stopping, off by default: early_stopping.patience=N ends a run after N validations without
# improvement of monitor (default: the evaluator's main score) by more than min_delta (EarlyStoppingHook)
early_stopping = dict(patience=None, monitor=None, min_delta=0.0)
# a fixed, seeded fraction of the training samples for fast iteration (e.g. 0.1), the same in every run
dataset_fraction = None
