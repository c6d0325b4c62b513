# OFAT baseline: frozen ViM-tiny + Cascade R-CNN, AdamW lr 1e-3, batch 8, 100 epochs.
from rat_plugins.detectron2.schedule import set_epoch_schedule

from ..common.heads_data import dataloader
from ..common.optim import AdamW as optimizer
from ..common.train import lr_multiplier, train
from ..common.vim_tiny_cascade_rcnn import model

optimizer.lr = 0.001
dataloader.train.total_batch_size = 8
set_epoch_schedule(train, lr_multiplier, dataloader, epochs=100)
