"""ViM (Vision Mamba) as a detectron2 Backbone: one stride-16 map for SimpleFeaturePyramid."""
import logging

from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec

from ..models.feature_cache import CachedFrozenForward
from ..models.vim import VimBackbone

logger = logging.getLogger(__name__)

__all__ = ["ViM", "build_vim_backbone", "add_vim_config"]


class ViM(Backbone):
    """detectron2 wrapper of :class:`rat_plugins.models.vim.VimBackbone`.

    Args:
        out_feature: name of the single output (ViTDet's SimpleFeaturePyramid reads ``last_feat``).
        feature_cache_dir: with ``freeze=True``, keep each image view's features on disk there and
            reuse them (see :mod:`rat_plugins.models.feature_cache`); "" turns the cache off. Ignored,
            with a log line, when the backbone trains.
        **kwargs: passed to ``VimBackbone`` (embed_dim, depth, freeze, checkpoint, ...).
    """

    def __init__(self, out_feature: str = "last_feat", checkpoint=None, feature_cache_dir: str = "", **kwargs):
        super().__init__()
        # configs write "" for "no checkpoint" (a command-line override cannot write None)
        self.net = VimBackbone(checkpoint=checkpoint or None, **kwargs)
        self._cached_net = None
        if feature_cache_dir and self.net.freeze:
            self._cached_net = CachedFrozenForward(self.net, feature_cache_dir)
        elif feature_cache_dir:
            logger.info("ViM trains (freeze=False): the frozen-feature cache is off")
        self._out_features = [out_feature]
        self._out_feature_strides = {out_feature: self.net.patch_size}
        self._out_feature_channels = {out_feature: self.net.embed_dim}

    @property
    def size_divisibility(self) -> int:
        return self.net.patch_size

    def forward(self, x):
        net = self._cached_net or self.net
        return {self._out_features[0]: net(x)}


def add_vim_config(cfg: CfgNode) -> None:
    """Add ``MODEL.VIM`` keys for yacs configs."""
    cfg.MODEL.VIM = CfgNode()
    cfg.MODEL.VIM.EMBED_DIM = 192
    cfg.MODEL.VIM.DEPTH = 24
    cfg.MODEL.VIM.FREEZE = True
    cfg.MODEL.VIM.CHECKPOINT = ""
    cfg.MODEL.VIM.LAST_LAYER_PROCESS = "add"
    cfg.MODEL.VIM.OUT_FEATURE = "last_feat"


@BACKBONE_REGISTRY.register()
def build_vim_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ViM:
    """yacs build function: ``MODEL.BACKBONE.NAME = "build_vim_backbone"`` after ``add_vim_config``."""
    if input_shape.channels != 3:
        raise ValueError(f"ViM expects 3 input channels, got {input_shape.channels}")
    v = cfg.MODEL.VIM
    return ViM(out_feature=v.OUT_FEATURE, embed_dim=v.EMBED_DIM, depth=v.DEPTH, freeze=v.FREEZE,
               checkpoint=v.CHECKPOINT or None, last_layer_process=v.LAST_LAYER_PROCESS)
