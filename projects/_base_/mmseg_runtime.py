# mmseg runtime shared by the SETR and RAT configs: plugin import, mmseg scope, logging to text + TensorBoard.
default_scope = "mmseg"
custom_imports = dict(imports=["rat_plugins.mm"], allow_failed_imports=False)
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    dist_cfg=dict(backend="nccl"),  # tools/train.py switches to gloo on machines without CUDA
)
# device_ids=None lets DistributedDataParallel wrap a CPU model as well as a single-GPU one
# (mmengine's default passes [LOCAL_RANK], which DDP refuses for CPU modules).
model_wrapper_cfg = dict(
    type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False, find_unused_parameters=False
)
# Scalars (loss, lr, Dice, IoU, Accuracy, ...) go to <work_dir>/<timestamp>/vis_data: scalars.json
# and a TensorBoard event file (`tensorboard --logdir work_dirs`).
vis_backends = [dict(type="LocalVisBackend"), dict(type="TensorboardVisBackend")]
visualizer = dict(type="SegLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(by_epoch=False)
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
