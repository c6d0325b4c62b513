"""RAT (Resolution Aware Transformer) as a detectron2 Backbone: one map per pyramid level and block.

Output names are ``level<l>_block<b>`` rather than ``p<log2 stride>``: with an image pyramid,
several maps share a stride (level 1 block 0 and level 0 block 1 are both stride 4 with the
defaults), so the stride cannot name them; ``output_shape()`` gives each map's stride.
"""

import math
from typing import Sequence, Union

from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec

from ..models.features import select_features
from ..models.rat_backbone import RATBackbone

__all__ = ["RAT", "build_rat_backbone", "add_rat_config"]


class RAT(Backbone):
    """detectron2 wrapper of :class:`rat_plugins.models.rat_backbone.RATBackbone` (2D).

    The input is detectron2's padded image batch; the backbone builds the pyramid given by
    ``scales`` from it. ``size_divisibility`` is the largest output stride, so every output is
    exactly ``padded size / stride`` and FPN's 2x top-down upsampling lines up.

    ``out_features`` chooses the maps, in order: None / ``'all'`` (every map, level-major),
    ``'by_stride'`` (every map, finest stride first, ties finer level first), or names (or 0-based
    indices into ``net.feature_info``). For FPN name maps whose strides double, as its
    ``in_features`` reads them, e.g. with ``num_blocks=2, scales=(1, 0.5, 0.25)``:
    ``level0_block0, level0_block1, level1_block1, level2_block1`` (strides 2, 4, 8, 16).

    Args:
        out_features: the maps to return, see above.
        **kwargs: passed to ``RATBackbone`` (feature_dims, num_blocks, num_heads, scales,
            attention (incl. ``'mha'``), local_window, pos_embed, abs_ref_size, rotary_ratio,
            spacing, sga_kernel_size, stride, ...).
    """

    def __init__(self, out_features: Union[None, str, Sequence[Union[str, int]]] = None, **kwargs):
        super().__init__()
        self.net = RATBackbone(spatial_dims=2, **kwargs)
        info = {i.name: i for i in self.net.feature_info}
        self._out_features = list(self.net.resolve_out_features(out_features or None))
        self._out_feature_strides = {}
        for name in self._out_features:
            stride = info[name].stride
            # detectron2 has one integer stride per map
            if len(set(stride)) != 1 or not isinstance(stride[0], int):
                raise ValueError(
                    f"{name} has stride {stride}; detectron2 needs one integer stride per map (check stride and scales)"
                )
            self._out_feature_strides[name] = stride[0]
        self._out_feature_channels = {name: info[name].channels for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return math.lcm(*self._out_feature_strides.values())

    @property
    def padding_constraints(self):
        return {"size_divisibility": self.size_divisibility}

    def forward(self, x):
        return select_features(self.net.forward_features(x), self._out_features)


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
    # "dense", "local", "mha", "mixed", or one kind per block separated by commas ("local,dense")
    cfg.MODEL.RAT.ATTENTION = "dense"
    cfg.MODEL.RAT.NEIGHBORHOOD_KERNEL = 0  # local window size; 0: the grouping kernel size
    cfg.MODEL.RAT.POS_EMBED = "rotary"  # or "absolute" (with ROTARY_RATIO 0.0)
    cfg.MODEL.RAT.ABS_REF_SIZE = 256.0
    cfg.MODEL.RAT.ROTARY_RATIO = 0.5
    cfg.MODEL.RAT.SPACING = 1.0
    cfg.MODEL.RAT.OUT_FEATURES = []


@BACKBONE_REGISTRY.register()
def build_rat_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> RAT:
    """yacs build function: ``MODEL.BACKBONE.NAME = "build_rat_backbone"`` after ``add_rat_config``."""
    c = cfg.MODEL.RAT
    attention = c.ATTENTION.split(",") if "," in c.ATTENTION else c.ATTENTION
    local_window = {"neighborhood_kernel": c.NEIGHBORHOOD_KERNEL} if c.NEIGHBORHOOD_KERNEL else None
    return RAT(
        out_features=list(c.OUT_FEATURES) or None,
        input_features=input_shape.channels,
        feature_dims=c.FEATURE_DIMS,
        num_blocks=c.NUM_BLOCKS,
        num_heads=c.NUM_HEADS,
        iters=c.ITERS,
        sga_kernel_size=c.SGA_KERNEL_SIZE,
        stride=c.STRIDE,
        scales=list(c.SCALES),
        attention=attention,
        local_window=local_window,
        pos_embed=c.POS_EMBED,
        abs_ref_size=c.ABS_REF_SIZE,
        rotary_ratio=c.ROTARY_RATIO,
        spacing=c.SPACING,
    )
