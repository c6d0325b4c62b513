# RAT (3-level image pyramid 1, 1/2, 1/4; local grouping attention) -> FPN P2-P6 -> Faster R-CNN on
# COCO 2017 at <dataset root>/coco2017 (datasets/README.md). detectron2 LazyConfig:
#   python tools/lazyconfig_train_net.py --config-file projects/RAT/configs/coco/rat_fpn_3level_coco.py
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from rat_plugins.detectron2.data import coco2017_dicts
from rat_plugins.detectron2.rat import RAT

# -- model: the zoo's Mask R-CNN FPN without its mask branch (= Faster R-CNN FPN)
model = get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up = L(RAT)(
    # level l block b has stride 2 ** (l + b + 1): one map per FPN stride 4, 8, 16, 32, taking each
    # coarser stride from a coarser level so that all three levels feed the detector
    out_features=["level0_block1", "level1_block1", "level2_block1", "level2_block2"],
    input_features=3,
    feature_dims=128,
    num_blocks=3,
    num_heads=8,
    iters=3,
    sga_kernel_size=5,
    stride=2,
    scales=(1.0, 0.5, 0.25),
    attention="local",  # dense grouping would hold a (H/2 x W/2) x (H x W) matrix per head
)
# The multi-resolution block after each grouping still attends densely over all levels' tokens
# (block 0 at 800x1344: 269k + 67k + 17k): the bulk of the cost at COCO sizes.

# FPN pads images to its coarsest input stride (32), which is also RAT's size_divisibility, so
# every map is exactly padded size / stride; RAT takes any such size: no square padding.
model.backbone.in_features = "${.bottom_up.out_features}"
model.roi_heads.num_classes = 80  # must match the annotation file's categories (override for others)
model.roi_heads.mask_in_features = None
model.roi_heads.mask_pooler = None
model.roi_heads.mask_head = None
# RAT is trained from scratch with LayerNorm: ImageNet statistics in RGB, not the zoo's Caffe BGR
# mean with std 1 (made for its frozen-BN ResNet)
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"

# -- data: the zoo's COCO loaders (multi-scale 640-800 training, 800 test) on our names, which
# register when a loader is built (detectron2's coco_2017_* would read datasets/coco/, the head set)
dataloader = get_config("common/data/coco.py").dataloader
dataloader.train.dataset._target_ = coco2017_dicts
dataloader.train.dataset.names = "coco2017_train"
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.use_instance_mask = False  # no mask head: skip decoding polygons / RLE
dataloader.test.dataset._target_ = coco2017_dicts
dataloader.test.dataset.names = "coco2017_val"
# dataloader.evaluator: COCOEvaluator on ${test.dataset.names}: AP, AP50, AP75, APs, APm, APl

# -- optimisation: AdamW as detectron2's ViTDet configs, the zoo's 1x multistep schedule
# (90k iterations at batch 16, lr x0.1 at 60k and 80k)
optimizer = get_config("common/optim.py").AdamW
optimizer.lr = 1e-4
optimizer.weight_decay = 0.05
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x

train = get_config("common/train.py").train
train.init_checkpoint = ""  # no pretrained RAT
train.max_iter = 90000
# the zoo checkpoints every 5000 iterations (hours of COCO training lost to a kill): every 1000 (about
# 15 minutes at batch 16), keeping the last 3 (--resume falls back to an older one if the last is damaged)
train.checkpointer.period = 1000
train.checkpointer.max_to_keep = 3
# fixed seed (the zoo's -1 draws a new one per run); the project's tool records it in run_config.json
train.seed = 0
# the project's tool: cuda if available, else cpu; detectron2's stock tool needs train.device=cuda (or cpu)
train.device = "auto"
