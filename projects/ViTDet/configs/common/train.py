# Training settings for tools/lazyconfig_train_net.py (project or stock detectron2 tool).
from detectron2.model_zoo import get_config

from rat_plugins.detectron2.schedule import multistep_with_warmup

train = get_config("common/train.py").train
train.output_dir = "./output"
train.init_checkpoint = ""  # the backbone loads its own checkpoint (model.backbone.net.checkpoint)
# the project's tool: cuda if available, else cpu; detectron2's stock tool needs train.device=cuda (or cpu)
train.device = "auto"
train.log_period = 20
train.checkpointer.max_to_keep = 3
# fixed by default, so a run can be repeated (each process seeds train.seed + its rank; the project's
# tool records the seed and deterministic settings in run_config.json); train.seed=-1: a new seed per run
train.seed = 0
# MLflow (the project's tool): sqlite:///<work dir's parent>/mlflow.db unless $MLFLOW_TRACKING_URI or
# uri names another store; experiment: the config's folder (OFAT); run name: the work dir's name
train.tracking = dict(enabled=True, uri=None, experiment=None, run_name=None)
# memory switches (the project's tool; shortcuts --amp / --amp-dtype, --activation-checkpointing, --clip-grad):
# mixed precision (float16 with loss scaling on CUDA, bfloat16 on CUDA or CPU), recomputed block
# activations in the backward pass, gradient clipping by total norm
train.amp.dtype = "float16"
train.activation_checkpointing = False
train.clip_grad_norm = None
# --auto-batch: the largest micro-batch that fits (CUDA: the device; CPU: memory_budget_gb, default 60 %
# of the available RAM), gradients accumulated up to the batch; the plan is kept in the work dir
train.auto_batch = False
train.memory_budget_gb = None
train.micro_batch_size = None  # e.g. 2: accumulate gradients so a bs-8 run fits an 8 GB GPU

lr_multiplier = multistep_with_warmup()
# model_best.pth whenever this validation metric improves (detectron2's BestCheckpointer); at the end
# the test split is evaluated with it as well as with the final model (final_metrics.json "best"); None: off
train.best_checkpoint_metric = "bbox/AP50"
# early stopping, off by default: train.early_stopping.patience=N ends a run after N evaluations without
# improvement of metric (default: best_checkpoint_metric) by more than min_delta
train.early_stopping = dict(patience=None, metric=None, min_delta=0.0)
# a fixed, seeded fraction of the training images for fast iteration (e.g. 0.1); the same images in every
# run of a sweep; the epochs are epochs of the subset; validation and test stay whole
train.dataset_fraction = None
