# OFAT: the baseline with one factor changed: 150 epochs.
from detectron2.config import LazyConfig

from rat_plugins.detectron2.schedule import set_epoch_schedule

model, dataloader, optimizer, train, lr_multiplier = LazyConfig.load_rel(
    "baseline_lr0.001_bs8_adamw_ep100.py", ("model", "dataloader", "optimizer", "train", "lr_multiplier")
)
set_epoch_schedule(train, lr_multiplier, dataloader, epochs=150)
