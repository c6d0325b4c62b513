"""ISIC 2018 Task 1 lesion segmentation on mmseg: the dataset, the lesion metric, and the RAT
ablation backbone (positional encoding / attention variants the package does not offer).

Dataset (``type='ISIC2018Dataset'``). The ISIC 2018 layout (``shared/formats.md`` section 2)::

    <data_root>/ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg  (+ ATTRIBUTION.txt, LICENSE.txt)
    <data_root>/ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png
    ... Validation / Test likewise

``split='Training' | 'Validation' | 'Test'`` picks the two folders (or give ``data_prefix``
yourself). Masks are single-channel 0 / 255 PNGs; the dataset's label map turns 255 into class 1
(``lesion``) inside mmseg's ``LoadAnnotations``, so the pipeline stays stock. Any other mask value
would reach the loss as an invalid class: real and synthetic ISIC masks have none. A missing
folder, an image without a mask or a mask without an image raises ``FileNotFoundError`` naming
the files (the first few) and the layout expected.

Where the pyramid is built. The seeds' ``ISICDataset(multi_scale, scales)`` resized every image
to 256 / 128 / 64 in the data pipeline. Here the pipeline produces one image (resize, flip; the
data preprocessor normalises) and the RAT backbone builds the pyramid from it with its
``scales`` (area resizing, :meth:`rat_plugins.models.rat_backbone.RATBackbone.build_pyramid`):

- mmseg's collate, ``SegDataPreProcessor``, ``EncoderDecoder`` and test-time resizing all expect
  one tensor per sample; a pipeline pyramid would need a custom pack, preprocessor and segmentor;
- the level sizes always match the strides the backbone reports (``ceil(size * scale)``), also
  when the evaluation resolution changes (robustness study), with nothing in the data to keep in
  step with the model;
- the resize runs on the accelerator, batched, and the single / dual / triple configs share one
  data pipeline and differ in ``model.backbone.scales`` only.

``LesionMetric`` is :class:`rat_plugins.mm.metrics.VesselMetric` (Dice, IoU, accuracy,
sensitivity, specificity of class 1 plus ``IoUMetric``'s means) under the lesion name: the
dataset's classes are ``('background', 'lesion')`` and the foreground index is 1, as the metric
assumes.

``RATAblation`` (``type='RATAblation'``) is the mmseg ``RAT`` backbone with the two ablation
options the package lacks (what the package does offer is set with its own keyword arguments,
see ``projects/RAT/configs/ablations/``):

- ``pos_embed='absolute'``: a fixed 2D sine-cosine embedding of each token's centre, in pixels of
  a ``abs_ref_size`` frame (the normalised image coordinate times ``abs_ref_size``, so the levels
  of a pyramid agree on positions), added to the input projection's output of every level; the
  rotary encoding must be off (``rotary_ratio=0.0``), else two encodings would be compared.
- ``attention='mha'``: every grouping layer becomes :class:`StandardMHAGrouping`, the package's
  layer with standard multi-head attention (softmax over keys) instead of grouping attention
  (softmax over keys, then renormalised over the queries so groups compete for pixels);
  weights, RoSE, strided-conv queries, iterations and MLP unchanged.
"""
import os.path as osp
from typing import List, Optional

from mmengine import fileio
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS, METRICS, MODELS

from ..models.rat_ablations import AbsolutePositionConv, StandardMHAGrouping
from .metrics import VesselMetric
from .rat import RAT

__all__ = ["ISIC2018Dataset", "LesionMetric", "RATAblation", "StandardMHAGrouping", "AbsolutePositionConv",
           "ISIC_FOLDERS"]

ISIC_FOLDERS = {
    "Training": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "Validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "Test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}


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
                  "(a synthetic stand-in: python -m rat_plugins.data.synthetic isic --out DIR)")
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
            def few(names, suffix):
                return ", ".join(n + suffix for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems = []
            if no_mask:
                problems.append(f"{len(no_mask)} image(s) in {img_dir} without a mask in {ann_dir}: "
                                f"{few(no_mask, self.img_suffix)}")
            if no_image:
                problems.append(f"{len(no_image)} mask(s) in {ann_dir} without an image in {img_dir}: "
                                f"{few(no_image, self.seg_map_suffix)}")
            raise FileNotFoundError("ISIC2018Dataset: image / mask pairs do not match; " + "; ".join(problems))
        return [dict(img_path=osp.join(img_dir, name + self.img_suffix),
                     seg_map_path=osp.join(ann_dir, name + self.seg_map_suffix),
                     label_map=self.label_map, reduce_zero_label=self.reduce_zero_label, seg_fields=[])
                for name in images]


@METRICS.register_module()
class LesionMetric(VesselMetric):
    """:class:`~rat_plugins.mm.metrics.VesselMetric` for lesions: Dice, IoU, accuracy, sensitivity,
    specificity of class 1 (``lesion`` in :class:`ISIC2018Dataset`), pooled over the dataset."""


# ----------------------------------------------------------------------------- ablation backbone

@MODELS.register_module()
class RATAblation(RAT):
    """mmseg ``RAT`` with the ablation options the package does not have.

    Args:
        pos_embed: ``'rotary'`` (the package's RoSE / RoPE, as set by its keyword arguments) or
            ``'absolute'`` (:class:`AbsolutePositionConv`; needs ``rotary_ratio=0.0``).
        abs_ref_size: frame size (pixels) of the absolute embedding's coordinates.
        attention: as ``RAT``'s, plus ``'mha'``: every block's grouping layer becomes
            :class:`StandardMHAGrouping`.
        **kwargs: ``RAT`` / ``RATBackbone`` arguments.
    """

    def __init__(self, pos_embed: str = "rotary", abs_ref_size: float = 256.0, attention="dense", **kwargs):
        if pos_embed not in ("rotary", "absolute"):
            raise ValueError(f"RATAblation: pos_embed must be 'rotary' or 'absolute', got {pos_embed!r}")
        if pos_embed == "absolute" and kwargs.get("rotary_ratio", 0.5) != 0:
            raise ValueError("RATAblation: pos_embed='absolute' compares against rotary encodings; "
                             "switch those off with rotary_ratio=0.0")
        if pos_embed == "absolute" and kwargs.get("spatial_dims", 2) != 2:
            raise ValueError("RATAblation: pos_embed='absolute' is implemented for 2D images only")
        mha = attention == "mha"
        super().__init__(attention="dense" if mha else attention, **kwargs)
        self.pos_embed = pos_embed
        if pos_embed == "absolute":
            self.net.init_proj = AbsolutePositionConv.from_conv(self.net.init_proj, abs_ref_size)
        if mha:
            for layer in self.net.sga_layers:
                StandardMHAGrouping.from_layer(layer)
            self.net.attention_kinds = ("mha",) * len(self.net.sga_layers)
