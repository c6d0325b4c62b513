"""ViM (Vision Mamba) as a detectron2 Backbone: one stride-16 map for SimpleFeaturePyramid."""

import logging

from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec

from ..models.feature_cache import CachedFrozenForward
from ..models.features import resolve_out_features, select_features
from ..models.vim import VimBackbone

logger = logging.getLogger(__name__)

__all__ = ["ViM", "build_vim_backbone", "add_vim_config"]


class ViM(Backbone):
    """detectron2 wrapper of :class:`rat_plugins.models.vim.VimBackbone`.

    Args:
        out_feature: the map to return, by name (``last_feat``, which ViTDet's SimpleFeaturePyramid
            reads) or 0-based index into the backbone's ``feature_info``.
        checkpoint: official ViM weights; "" or None for random weights.
        feature_cache_dir: with ``frozen=True``, keep each image view's features on disk there and
            reuse them (see :mod:`rat_plugins.models.feature_cache`); "" turns the cache off. Ignored,
            with a log line, when the backbone trains.
        **kwargs: passed to ``VimBackbone`` (embed_dim, depth, frozen, ...).
    """

    def __init__(self, out_feature="last_feat", checkpoint=None, feature_cache_dir: str = "", **kwargs):
        super().__init__()
        # configs write "" for "no checkpoint" (a command-line override cannot write None)
        self.net = VimBackbone(checkpoint=checkpoint or None, **kwargs)
        self._cached_features = None
        if feature_cache_dir and self.net.frozen:
            self._cached_features = CachedFrozenForward(self.net, feature_cache_dir, compute=self.net.forward_features)
        elif feature_cache_dir:
            logger.info("ViM trains (frozen=False): the frozen-feature cache is off")
        self._out_features = list(resolve_out_features(self.net.feature_info, out_feature))
        info = {i.name: i for i in self.net.feature_info}
        self._out_feature_strides = {name: info[name].stride for name in self._out_features}
        self._out_feature_channels = {name: info[name].channels for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return self.net.patch_size

    def forward(self, x):
        features = self._cached_features(x) if self._cached_features is not None else self.net.forward_features(x)
        return select_features(features, self._out_features)


def add_vim_config(cfg: CfgNode) -> None:
    """Add ``MODEL.VIM`` keys for yacs configs (``FREEZE``: the deprecated name of ``FROZEN``)."""
    cfg.MODEL.VIM = CfgNode()
    cfg.MODEL.VIM.EMBED_DIM = 192
    cfg.MODEL.VIM.DEPTH = 24
    cfg.MODEL.VIM.FROZEN = True
    cfg.MODEL.VIM.FREEZE = None
    cfg.MODEL.VIM.CHECKPOINT = ""
    cfg.MODEL.VIM.LAST_LAYER_PROCESS = "add"
    cfg.MODEL.VIM.OUT_FEATURE = "last_feat"


@BACKBONE_REGISTRY.register()
def build_vim_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ViM:
    """yacs build function: ``MODEL.BACKBONE.NAME = "build_vim_backbone"`` after ``add_vim_config``."""
    if input_shape.channels != 3:
        raise ValueError(f"ViM expects 3 input channels, got {input_shape.channels}")
    v = cfg.MODEL.VIM
    frozen = {"frozen": v.FROZEN} if v.FREEZE is None else {"freeze": v.FREEZE}
    return ViM(
        out_feature=v.OUT_FEATURE,
        embed_dim=v.EMBED_DIM,
        depth=v.DEPTH,
        checkpoint=v.CHECKPOINT or None,
        last_layer_process=v.LAST_LAYER_PROCESS,
        **frozen,
    )
