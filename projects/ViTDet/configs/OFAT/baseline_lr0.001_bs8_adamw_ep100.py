# OFAT baseline: frozen ViM-tiny + Cascade R-CNN, AdamW lr 1e-3, batch 8, 100 epochs.
from rat_plugins.detectron2.data import head_detection_num_images
from rat_plugins.detectron2.schedule import set_epoch_schedule

from ..common.head_detection_data import dataloader
from ..common.optim import AdamW as optimizer
from ..common.train import lr_multiplier, train
from ..common.vim_tiny_cascade_rcnn import model

optimizer.lr = 0.001
dataloader.train.total_batch_size = 8
# the image count is read from the training split's annotation file (nothing registered or written)
set_epoch_schedule(train, lr_multiplier, dataloader, epochs=100, num_images=head_detection_num_images("train"))
