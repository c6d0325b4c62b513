"""ViM as an mmseg / mmdet backbone (``type='ViM'``)."""

from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.model import BaseModule
from mmseg.registry import MODELS as MMSEG_MODELS

from ..models.vim import VimBackbone

__all__ = ["ViM", "ViMBackbone"]


class ViM(BaseModule):
    """:class:`rat_plugins.models.vim.VimBackbone` returning its one map (stride 16) as a 1-tuple.

    Args:
        init_cfg: mmengine init config (the ViM weights come from ``checkpoint`` instead).
        **kwargs: passed to ``VimBackbone`` (embed_dim, depth, frozen, checkpoint, ...).
    """

    def __init__(self, init_cfg=None, **kwargs):
        super().__init__(init_cfg)
        self.net = VimBackbone(**kwargs)

    def forward(self, x):
        return tuple(self.net.forward_features(x).values())


ViMBackbone = ViM  # the former class name

for _registry in (MMSEG_MODELS, MMDET_MODELS):
    _registry.register_module(name="ViM", module=ViM)
