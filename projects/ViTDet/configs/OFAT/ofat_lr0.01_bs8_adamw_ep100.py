# OFAT: the baseline with one factor changed: learning rate 0.01.
from detectron2.config import LazyConfig

model, dataloader, optimizer, train, lr_multiplier = LazyConfig.load_rel(
    "baseline_lr0.001_bs8_adamw_ep100.py", ("model", "dataloader", "optimizer", "train", "lr_multiplier")
)
optimizer.lr = 0.01
