# OFAT: the baseline with one factor changed: RMSprop (alpha 0.99, eps 1e-8, weight decay 1e-4).
from detectron2.config import LazyConfig

from ..common.optim import RMSprop

model, dataloader, optimizer, train, lr_multiplier = LazyConfig.load_rel(
    "baseline_lr0.001_bs8_adamw_ep100.py", ("model", "dataloader", "optimizer", "train", "lr_multiplier")
)
optimizer = RMSprop
optimizer.lr = 0.001
