"""Binary segmentation metrics for mmseg (Dice, IoU, accuracy, sensitivity, specificity) and RVT's
detection evaluation for mmdet (``RVTCocoMetric``).

mmseg's ``IoUMetric`` reports class means; vessel and lesion segmentation are judged on the
foreground class, with sensitivity and specificity. ``VesselMetric`` reports all of
``IoUMetric``'s keys plus those five for ``foreground_index``, in percent, pooled over the
dataset (the usual DRIVE protocol) or averaged per image.
"""

import warnings
from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np
import torch
from mmdet.evaluation.metrics import CocoMetric
from mmdet.registry import METRICS as MMDET_METRICS
from mmengine.logging import MMLogger, print_log
from mmseg.evaluation.metrics import IoUMetric
from mmseg.registry import METRICS

from ..data.rvt_events import RVT_SKIP_FIRST_US, rvt_box_filter, rvt_box_thresholds

__all__ = ["VesselMetric", "LesionMetric", "RVTCocoMetric", "binary_scores"]

SCORE_NAMES = ("Dice", "IoU", "Accuracy", "Sensitivity", "Specificity")


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else float(num) / float(den)


def binary_scores(tp: float, fp: float, fn: float, tn: float) -> Dict[str, float]:
    """Dice, IoU, accuracy, sensitivity and specificity (fractions in [0, 1]) from pixel counts.

    ``Dice = 2TP / (2TP + FP + FN)``, ``IoU = TP / (TP + FP + FN)``, ``Accuracy = (TP + TN) / N``,
    ``Sensitivity = TP / (TP + FN)``, ``Specificity = TN / (TN + FP)``. A ratio whose denominator
    is 0 counts as 1.0 (its errors are 0 too: an empty prediction on an empty ground truth is
    perfect); NaN everywhere when no pixel is evaluated (``tp + fp + fn + tn == 0``).
    """
    if tp + fp + fn + tn == 0:
        return {k: float("nan") for k in SCORE_NAMES}
    return OrderedDict(
        Dice=_ratio(2 * tp, 2 * tp + fp + fn),
        IoU=_ratio(tp, tp + fp + fn),
        Accuracy=_ratio(tp + tn, tp + fp + fn + tn),
        Sensitivity=_ratio(tp, tp + fn),
        Specificity=_ratio(tn, tn + fp),
    )


@METRICS.register_module()
class VesselMetric(IoUMetric):
    """``IoUMetric`` plus Dice, IoU, accuracy, sensitivity, specificity of the foreground class.

    Args:
        foreground_index: label of the foreground (vessel) class. Default 1.
        aggregate: ``'dataset'`` pools pixel counts over all images; ``'image'`` averages
            per-image scores.
        iou_metrics: what ``IoUMetric`` adds (class means). Default ``['mIoU', 'mDice']``.
        per_image: scores also reported averaged over the images, as ``<name>_per_image``, whatever
            ``aggregate`` is (``LesionMetric``: Dice and IoU, the ISIC convention).
        **kwargs: ``IoUMetric`` arguments (``ignore_index``, ``prefix``, ``output_dir``, ...).

    Keys reported: ``Dice``, ``IoU``, ``Accuracy``, ``Sensitivity``, ``Specificity`` (foreground,
    percent), the ``per_image`` ones and ``IoUMetric``'s ``aAcc``, ``mIoU``, ``mAcc``, ``mDice``.
    """

    def __init__(
        self,
        foreground_index: int = 1,
        aggregate: str = "dataset",
        iou_metrics: Sequence[str] = ("mIoU", "mDice"),
        per_image: Sequence[str] = (),
        **kwargs,
    ):
        if aggregate not in ("dataset", "image"):
            raise ValueError(f"VesselMetric: aggregate must be 'dataset' or 'image', got {aggregate!r}")
        unknown = sorted(set(per_image) - set(SCORE_NAMES))
        if unknown:
            raise ValueError(f"VesselMetric: per_image {unknown} are not scores; choose from {SCORE_NAMES}")
        super().__init__(iou_metrics=list(iou_metrics), **kwargs)
        self.foreground_index = int(foreground_index)
        self.aggregate = aggregate
        self.per_image = tuple(per_image)

    def _counts(self, area_intersect, area_pred, area_label):
        f = self.foreground_index
        n = float(area_label.sum())
        tp = float(area_intersect[f])
        fp = float(area_pred[f]) - tp
        fn = float(area_label[f]) - tp
        return tp, fp, fn, n - tp - fp - fn

    def compute_metrics(self, results: List) -> Dict[str, float]:
        if self.format_only:
            return super().compute_metrics(results)
        num_classes = len(self.dataset_meta["classes"])
        if not 0 <= self.foreground_index < num_classes:
            raise ValueError(
                f"VesselMetric: foreground_index {self.foreground_index} is not a class of "
                f"{self.dataset_meta['classes']}"
            )
        per_image = [binary_scores(*self._counts(r[0], r[2], r[3])) for r in results]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            image_means = {
                k: float(np.nanmean([s[k] for s in per_image])) if per_image else float("nan") for k in SCORE_NAMES
            }
        if self.aggregate == "dataset":
            inter, _, pred, label = (sum(r[i] for r in results) for i in range(4))
            scores = binary_scores(*self._counts(inter, pred, label))
        else:
            scores = image_means
        with warnings.catch_warnings():  # all-NaN classes (nothing evaluated): NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            metrics = super().compute_metrics(results)
        metrics.update({k: round(v * 100, 2) for k, v in scores.items()})
        metrics.update({f"{k}_per_image": round(image_means[k] * 100, 2) for k in self.per_image})
        name = self.dataset_meta["classes"][self.foreground_index]
        print_log(
            f"{name} ({self.aggregate}): " + ", ".join(f"{k} {metrics[k]:.2f}" for k in SCORE_NAMES),
            logger=MMLogger.get_current_instance(),
        )
        return metrics


@METRICS.register_module()
class LesionMetric(VesselMetric):
    """:class:`~rat_plugins.mm.metrics.VesselMetric` for lesions: Dice, IoU, accuracy, sensitivity,
    specificity of class 1 (``lesion`` in :class:`ISIC2018Dataset`), pooled over the dataset, and Dice
    and IoU averaged over the images (``Dice_per_image``, ``IoU_per_image``: the ISIC convention)."""

    def __init__(self, per_image: Sequence[str] = ("Dice", "IoU"), **kwargs):
        super().__init__(per_image=per_image, **kwargs)


# ---------------------------------------------------------------------------------------------- mmdet


@MMDET_METRICS.register_module()
class RVTCocoMetric(CocoMetric):
    """mmdet's ``CocoMetric`` after RVT's box filtering, as RVT evaluates Gen1 / 1Mpx / eTraM.

    Before each labelled frame enters COCO evaluation, its ground truth and its detections lose every
    box RVT's evaluation drops (:func:`rat_plugins.data.rvt_events.rvt_box_filter`): all boxes of the
    first ``skip_first_us`` of a recording, and boxes with a diagonal under ``min_box_diag`` or a side
    under ``min_box_side``. The frame stays (with no boxes it changes no AP). The frame's time is
    the data sample's ``timestamp_us`` (``RVTEventDataset`` sets it; µs from the recording's start).

    Args:
        camera: ``gen1`` (30 / 10 px), ``gen4`` / ``1mpx`` / ``etram`` (60 / 20 px).
        downsampled_by_2: the boxes are in pixels of the halved sensor (``downsample=True``, RVT's
            ``*_ds2_nearest`` input): the thresholds are halved, as RVT does.
        skip_first_us: the start of each recording that is not scored (RVT: 0.5 s).
        min_box_diag, min_box_side: explicit thresholds in the boxes' pixels (None: the camera's).
        **kwargs: ``CocoMetric`` arguments (``ann_file=None``: the ground truth comes from the samples).
    """

    def __init__(
        self,
        camera: str = "etram",
        downsampled_by_2: bool = True,
        skip_first_us: int = RVT_SKIP_FIRST_US,
        min_box_diag=None,
        min_box_side=None,
        **kwargs,
    ):
        diag, side = rvt_box_thresholds(camera, downsampled_by_2)
        self.min_box_diag = float(diag if min_box_diag is None else min_box_diag)
        self.min_box_side = float(side if min_box_side is None else min_box_side)
        self.skip_first_us = int(skip_first_us)
        super().__init__(**kwargs)

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        filtered = []
        for sample in data_samples:
            if "timestamp_us" not in sample:
                raise KeyError(
                    "RVTCocoMetric needs each sample's 'timestamp_us' (RVTEventDataset with PackEventClip puts it "
                    "in the metainfo) to drop the first 0.5 s of a recording"
                )
            sample = dict(sample)
            t = int(sample["timestamp_us"])
            pred = dict(sample["pred_instances"])
            keep = rvt_box_filter(
                pred["bboxes"].cpu().numpy(), t, self.min_box_diag, self.min_box_side, self.skip_first_us
            )
            keep = torch.as_tensor(keep, device=pred["bboxes"].device)
            sample["pred_instances"] = {k: v[keep] for k, v in pred.items()}
            instances = sample.get("instances", [])
            gt_keep = rvt_box_filter(
                [i["bbox"] for i in instances], t, self.min_box_diag, self.min_box_side, self.skip_first_us
            )
            sample["instances"] = [i for i, k in zip(instances, gt_keep) if k]
            filtered.append(sample)
        super().process(data_batch, filtered)
