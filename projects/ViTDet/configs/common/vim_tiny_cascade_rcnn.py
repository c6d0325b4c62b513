# ViM-tiny (frozen) -> SimpleFeaturePyramid P2-P6 -> RPN -> 3-stage Cascade R-CNN, boxes only.
import os

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.modeling import SimpleFeaturePyramid
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

from rat_plugins.detectron2.vim import ViM

# ViTDet's model (LN in the pyramid and heads, which trains from scratch where frozen BN diverges).
model = get_config("common/models/mask_rcnn_vitdet.py").model
model.backbone = L(SimpleFeaturePyramid)(
    net=L(ViM)(
        embed_dim=192,
        depth=24,
        last_layer_process="add",
        frozen=True,
        checkpoint="ckpts/vim_tiny_pretrained.pth",
        out_feature="last_feat",
        # frozen features of each image view computed once and shared by the runs of a sweep;
        # model.backbone.net.feature_cache_dir="" turns it off
        feature_cache_dir=os.environ.get("RAT_FEATURE_CACHE", "work_dirs/feature_cache"),
    ),
    in_feature="${.net.out_feature}",
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),  # P2-P5 from the stride-16 map; P6 from max-pool
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=0,  # ViM takes any size: no padding to a fixed square
)
model.roi_heads.num_classes = 1
model.roi_heads.mask_in_features = None
model.roi_heads.mask_pooler = None
model.roi_heads.mask_head = None
model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm="LN",
        )
        for _ in range(3)
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
        )
        for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False) for th in [0.5, 0.6, 0.7]
    ],
)
del model.roi_heads.box_head
del model.roi_heads.box_predictor
del model.roi_heads.proposal_matcher
