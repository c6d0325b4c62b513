"""ViM as an mmseg / mmdet backbone, and the Roboflow head-detection export as an mmdet dataset."""
from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS as MMDET_DATASETS, MODELS as MMDET_MODELS
from mmengine.model import BaseModule
from mmseg.registry import MODELS as MMSEG_MODELS

from ..data.roboflow import filter_roboflow_coco
from ..models.vim import VimBackbone

__all__ = ["ViM", "ViMBackbone", "RoboflowCocoDataset"]


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


@MMDET_DATASETS.register_module()
class RoboflowCocoDataset(CocoDataset):
    """CocoDataset over a Roboflow export's original ``_annotations.coco.json``.

    Reads the filtered copy (supercategory entry removed, invalid boxes dropped) that
    :func:`rat_plugins.data.roboflow.filter_roboflow_coco` writes beside the original; the
    class names come from the file unless ``metainfo`` sets them.
    """

    def load_data_list(self):
        stats = filter_roboflow_coco(self.ann_file)
        if not self._metainfo.get("classes"):
            self._metainfo["classes"] = tuple(stats["categories"])
        self.ann_file = stats["path"]
        return super().load_data_list()
