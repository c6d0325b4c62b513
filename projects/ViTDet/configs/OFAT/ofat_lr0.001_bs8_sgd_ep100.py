# OFAT: the baseline with one factor changed: SGD (momentum 0.9, weight decay 1e-4).
from detectron2.config import LazyConfig

from ..common.optim import SGD

model, dataloader, optimizer, train, lr_multiplier = LazyConfig.load_rel(
    "baseline_lr0.001_bs8_adamw_ep100.py", ("model", "dataloader", "optimizer", "train", "lr_multiplier")
)
optimizer = SGD
optimizer.lr = 0.001
