"""RAT (Resolution Aware Transformer) as a detectron2 Backbone: one map per pyramid level and block.

Output names are ``level<l>_block<b>`` rather than ``p<log2 stride>``: with an image pyramid,
several maps share a stride (level 1 block 0 and level 0 block 1 are both stride 4 with the
defaults), so the stride cannot name them; ``output_shape()`` gives each map's stride.
"""
import math
from typing import Optional, Sequence

from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec

from ..models.rat_backbone import RATBackbone

__all__ = ["RAT", "build_rat_backbone", "add_rat_config"]


class RAT(Backbone):
    """detectron2 wrapper of :class:`rat_plugins.models.rat_backbone.RATBackbone` (2D).

    The input is detectron2's padded image batch; the backbone builds the pyramid given by
    ``scales`` from it. ``size_divisibility`` is the largest output stride, so every output is
    exactly ``padded size / stride`` and FPN's 2x top-down upsampling lines up. For FPN choose
    ``in_features`` whose strides double, e.g. with ``num_blocks=2, scales=(1, 0.5, 0.25)``:
    ``level0_block0, level0_block1, level1_block1, level2_block1`` (strides 2, 4, 8, 16).

    Args:
        out_features: names to return (default: all, level-major).
        **kwargs: passed to ``RATBackbone`` (feature_dims, num_blocks, num_heads, scales,
            attention, local_window, spacing, sga_kernel_size, stride, ...).
    """

    def __init__(self, out_features: Optional[Sequence[str]] = None, **kwargs):
        super().__init__()
        self.net = RATBackbone(spatial_dims=2, **kwargs)
        info = {i.name: i for i in self.net.feature_info}
        self._out_features = list(out_features) if out_features else list(info)
        unknown = [n for n in self._out_features if n not in info]
        if unknown:
            raise ValueError(f"unknown out_features {unknown}; this backbone has {list(info)}")
        self._out_feature_strides = {}
        for name in self._out_features:
            stride = info[name].stride
            # detectron2 has one integer stride per map
            if len(set(stride)) != 1 or not isinstance(stride[0], int):
                raise ValueError(f"{name} has stride {stride}; detectron2 needs one integer stride per map "
                                 f"(check stride and scales)")
            self._out_feature_strides[name] = stride[0]
        self._out_feature_channels = {name: info[name].channels for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return math.lcm(*self._out_feature_strides.values())

    @property
    def padding_constraints(self):
        return {"size_divisibility": self.size_divisibility}

    def forward(self, x):
        features = self.net.forward_features(x)
        return {name: features[name] for name in self._out_features}


def add_rat_config(cfg: CfgNode) -> None:
    """Add ``MODEL.RAT`` keys for yacs configs."""
    cfg.MODEL.RAT = CfgNode()
    cfg.MODEL.RAT.FEATURE_DIMS = 128
    cfg.MODEL.RAT.NUM_BLOCKS = 4
    cfg.MODEL.RAT.NUM_HEADS = 16
    cfg.MODEL.RAT.ITERS = 3
    cfg.MODEL.RAT.SGA_KERNEL_SIZE = 5
    cfg.MODEL.RAT.STRIDE = 2
    cfg.MODEL.RAT.SCALES = [1.0]
    # "dense", "local", "mixed", or one kind per block separated by commas ("local,dense")
    cfg.MODEL.RAT.ATTENTION = "dense"
    cfg.MODEL.RAT.NEIGHBORHOOD_KERNEL = 0  # local window size; 0: the grouping kernel size
    cfg.MODEL.RAT.SPACING = 1.0
    cfg.MODEL.RAT.OUT_FEATURES = []


@BACKBONE_REGISTRY.register()
def build_rat_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> RAT:
    """yacs build function: ``MODEL.BACKBONE.NAME = "build_rat_backbone"`` after ``add_rat_config``."""
    c = cfg.MODEL.RAT
    attention = c.ATTENTION.split(",") if "," in c.ATTENTION else c.ATTENTION
    local_window = {"neighborhood_kernel": c.NEIGHBORHOOD_KERNEL} if c.NEIGHBORHOOD_KERNEL else None
    return RAT(out_features=list(c.OUT_FEATURES) or None, input_features=input_shape.channels,
               feature_dims=c.FEATURE_DIMS, num_blocks=c.NUM_BLOCKS, num_heads=c.NUM_HEADS, iters=c.ITERS,
               sga_kernel_size=c.SGA_KERNEL_SIZE, stride=c.STRIDE, scales=list(c.SCALES), attention=attention,
               local_window=local_window, spacing=c.SPACING)
