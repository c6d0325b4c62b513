"""ISIC 2018 Task 1 lesion segmentation on mmseg: ``ISIC2018Dataset`` (the original folder layout,
see docs/formats.md, "ISIC 2018 Task 1") and ``LesionMetric``. The pipeline yields one image per
sample; the RAT backbone builds its pyramid from it (``model.backbone.scales``), so mmseg's collate,
preprocessor and test-time resizing stay stock.
"""
import os.path as osp
from typing import List, Optional

from mmengine import fileio
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS, METRICS

from ..data.isic_layout import ISIC_FOLDERS
from .metrics import VesselMetric

__all__ = ["ISIC2018Dataset", "LesionMetric"]


@DATASETS.register_module()
class ISIC2018Dataset(BaseSegDataset):
    """ISIC 2018 Task 1 (binary lesion segmentation) in its original folder layout.

    Args:
        split: ``'Training'``, ``'Validation'`` or ``'Test'``: sets ``data_prefix`` to that split's
            input and ground-truth folders. None: give ``data_prefix`` yourself.
        img_suffix: image suffix (``.jpg``; ``ATTRIBUTION.txt`` / ``LICENSE.txt`` are skipped).
        seg_map_suffix: mask suffix (``_segmentation.png``).
        **kwargs: ``BaseSegDataset`` arguments (``data_root``, ``pipeline``, ``data_prefix``, ...).
    """

    METAINFO = dict(classes=("background", "lesion"), palette=[[0, 0, 0], [255, 255, 255]])

    def __init__(self, split: Optional[str] = None, img_suffix: str = ".jpg",
                 seg_map_suffix: str = "_segmentation.png", **kwargs):
        if split is not None:
            if split not in ISIC_FOLDERS:
                raise ValueError(f"ISIC2018Dataset: split must be one of {sorted(ISIC_FOLDERS)}, got {split!r}")
            if kwargs.get("data_prefix"):
                raise ValueError("ISIC2018Dataset: give split or data_prefix, not both")
            img_dir, gt_dir = ISIC_FOLDERS[split]
            kwargs["data_prefix"] = dict(img_path=img_dir, seg_map_path=gt_dir)
        self.split = split
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, reduce_zero_label=False, **kwargs)

    @classmethod
    def get_label_map(cls, new_classes=None):
        """Masks store the lesion as 255: map it to class 1 (``LoadAnnotations`` applies this)."""
        if new_classes is not None and tuple(new_classes) != cls.METAINFO["classes"]:
            raise ValueError(f"ISIC2018Dataset has the classes {cls.METAINFO['classes']}, got {tuple(new_classes)}")
        return {0: 0, 255: 1}

    def load_data_list(self) -> List[dict]:
        img_dir = self.data_prefix.get("img_path", "")
        ann_dir = self.data_prefix.get("seg_map_path", "")
        layout = ("expected the ISIC 2018 Task 1 layout: <data_root>/ISIC2018_Task1-2_<Split>_Input/ISIC_XXXXXXX.jpg "
                  "and <data_root>/ISIC2018_Task1_<Split>_GroundTruth/ISIC_XXXXXXX_segmentation.png "
                  "(docs/formats.md, ISIC 2018 Task 1; a synthetic stand-in: "
                  "python -m rat_plugins.data.synthetic isic --out DIR)")
        for kind, folder in (("image", img_dir), ("mask", ann_dir)):
            if not folder or not osp.isdir(folder):
                raise FileNotFoundError(f"ISIC2018Dataset: {kind} folder {folder!r} does not exist; {layout}")
        images = sorted(f[:-len(self.img_suffix)] for f in fileio.list_dir_or_file(
            img_dir, list_dir=False, suffix=self.img_suffix, recursive=False, backend_args=self.backend_args))
        masks = sorted(f[:-len(self.seg_map_suffix)] for f in fileio.list_dir_or_file(
            ann_dir, list_dir=False, suffix=self.seg_map_suffix, recursive=False, backend_args=self.backend_args))
        if not images:
            raise FileNotFoundError(f"ISIC2018Dataset: no *{self.img_suffix} image in {img_dir}; {layout}")
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        if no_mask or no_image:
            problems = []
            if no_mask:
                problems.append(f"{len(no_mask)} image(s) in {img_dir} without a mask in {ann_dir}: "
                                f"{_first_few(no_mask, self.img_suffix)}")
            if no_image:
                problems.append(f"{len(no_image)} mask(s) in {ann_dir} without an image in {img_dir}: "
                                f"{_first_few(no_image, self.seg_map_suffix)}")
            raise FileNotFoundError("ISIC2018Dataset: image / mask pairs do not match; " + "; ".join(problems))
        return [dict(img_path=osp.join(img_dir, name + self.img_suffix),
                     seg_map_path=osp.join(ann_dir, name + self.seg_map_suffix),
                     label_map=self.label_map, reduce_zero_label=self.reduce_zero_label, seg_fields=[])
                for name in images]


def _first_few(names: List[str], suffix: str) -> str:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(n + suffix for n in names[:5]) + more


@METRICS.register_module()
class LesionMetric(VesselMetric):
    """:class:`~rat_plugins.mm.metrics.VesselMetric` for lesions: Dice, IoU, accuracy, sensitivity,
    specificity of class 1 (``lesion`` in :class:`ISIC2018Dataset`), pooled over the dataset."""
