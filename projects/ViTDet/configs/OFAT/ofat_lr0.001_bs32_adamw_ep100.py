# OFAT: the baseline with one factor changed: batch 32.
from detectron2.config import LazyConfig

from rat_plugins.detectron2.schedule import set_epoch_schedule

model, dataloader, optimizer, train, lr_multiplier = LazyConfig.load_rel(
    "baseline_lr0.001_bs8_adamw_ep100.py", ("model", "dataloader", "optimizer", "train", "lr_multiplier")
)
dataloader.train.total_batch_size = 32
set_epoch_schedule(train, lr_multiplier, dataloader)  # the baseline's epochs, the new batch
