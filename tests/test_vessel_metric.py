"""VesselMetric (rat_plugins.mm.metrics) against hand-computed values, empty cases included."""

import math

import pytest
import torch

from rat_plugins.mm.metrics import VesselMetric, binary_scores

CLASSES = ("background", "vessel")
# gt / pred on 2x4; 255 is ignored. Foreground counts: TP 2, FP 1, FN 1, TN 3 (7 valid pixels).
GT = [[1, 1, 0, 0], [0, 1, 0, 255]]
PRED = [[1, 0, 1, 0], [0, 1, 0, 1]]


def _sample(pred, gt):
    return {"pred_sem_seg": {"data": torch.tensor(pred)[None]}, "gt_sem_seg": {"data": torch.tensor(gt)[None]}}


def _evaluate(pairs, **kwargs):
    metric = VesselMetric(**kwargs)
    metric.dataset_meta = {"classes": CLASSES}
    metric.process({}, [_sample(p, g) for p, g in pairs])
    return metric.evaluate(len(pairs))


def test_hand_computed_values():
    m = _evaluate([(PRED, GT)])
    assert m["Dice"] == pytest.approx(100 * 4 / 6, abs=0.01)  # 2TP / (2TP + FP + FN)
    assert m["IoU"] == pytest.approx(50.0)  # TP / (TP + FP + FN)
    assert m["Accuracy"] == pytest.approx(100 * 5 / 7, abs=0.01)
    assert m["Sensitivity"] == pytest.approx(100 * 2 / 3, abs=0.01)
    assert m["Specificity"] == pytest.approx(75.0)
    # IoUMetric's class means stay: background IoU 3/5, Dice 6/8
    assert m["mIoU"] == pytest.approx(55.0) and m["mDice"] == pytest.approx(100 * (0.75 + 4 / 6) / 2, abs=0.01)
    assert m["aAcc"] == pytest.approx(100 * 5 / 7, abs=0.01)


@pytest.mark.parametrize(
    "pred,gt,expect",
    [
        # empty prediction, empty ground truth: nothing to find, nothing found -> perfect
        ([[0, 0], [0, 0]], [[0, 0], [0, 0]], dict(Dice=100, IoU=100, Accuracy=100, Sensitivity=100, Specificity=100)),
        # empty prediction, two vessel pixels: everything missed
        ([[0, 0], [0, 0]], [[1, 1], [0, 0]], dict(Dice=0, IoU=0, Accuracy=50, Sensitivity=0, Specificity=100)),
        # one false positive on an empty ground truth: no vessel to miss, sensitivity 1
        ([[1, 0], [0, 0]], [[0, 0], [0, 0]], dict(Dice=0, IoU=0, Accuracy=75, Sensitivity=100, Specificity=75)),
        # every pixel vessel and found: no background -> specificity by the 0/0 rule
        ([[1, 1], [1, 1]], [[1, 1], [1, 1]], dict(Dice=100, IoU=100, Accuracy=100, Sensitivity=100, Specificity=100)),
    ],
)
def test_empty_cases(pred, gt, expect):
    m = _evaluate([(pred, gt)])
    for k, v in expect.items():
        assert m[k] == pytest.approx(v), k


def test_nothing_evaluated_is_nan():
    s = binary_scores(0, 0, 0, 0)
    assert all(math.isnan(v) for v in s.values())
    m = _evaluate([([[1, 0]], [[255, 255]])])
    assert math.isnan(m["Dice"]) and math.isnan(m["Specificity"])


def test_dataset_vs_image_aggregation():
    pairs = [(PRED, GT), ([[0, 0], [0, 0]], [[0, 0], [0, 0]])]
    pooled = _evaluate(pairs)  # counts summed: TP 2, FP 1, FN 1, TN 7
    assert pooled["Dice"] == pytest.approx(100 * 4 / 6, abs=0.01)
    assert pooled["Accuracy"] == pytest.approx(100 * 9 / 11, abs=0.01)
    assert pooled["Specificity"] == pytest.approx(100 * 7 / 8, abs=0.01)
    per_image = _evaluate(pairs, aggregate="image")  # mean of the per-image scores
    assert per_image["Dice"] == pytest.approx((100 * 4 / 6 + 100) / 2, abs=0.01)
    assert per_image["IoU"] == pytest.approx(75.0)
    assert per_image["Specificity"] == pytest.approx(87.5)


def test_registered_and_checked():
    from mmseg.registry import METRICS

    metric = METRICS.build(dict(type="VesselMetric", aggregate="image"))
    assert isinstance(metric, VesselMetric)
    with pytest.raises(ValueError, match="aggregate"):
        VesselMetric(aggregate="mean")
    with pytest.raises(ValueError, match="foreground_index 3"):
        _evaluate([(PRED, GT)], foreground_index=3)


def test_lesion_metric_reports_dice_and_iou_per_image_beside_the_pooled_ones():
    """The ISIC convention: the mean of each image's Dice / IoU, next to the figures of the pooled pixels."""
    from rat_plugins.mm.metrics import LesionMetric

    pairs = [(PRED, GT), ([[0, 0], [0, 0]], [[0, 0], [0, 0]])]
    metric = LesionMetric()
    metric.dataset_meta = {"classes": ("background", "lesion")}
    metric.process({}, [_sample(p, g) for p, g in pairs])
    m = metric.evaluate(len(pairs))
    assert m["Dice"] == pytest.approx(100 * 4 / 6, abs=0.01)  # pooled
    assert m["Dice_per_image"] == pytest.approx((100 * 4 / 6 + 100) / 2, abs=0.01)
    assert m["IoU_per_image"] == pytest.approx(75.0)
    assert "Dice_per_image" not in _evaluate(pairs)  # the vessel metric reports only what it is asked for
    with pytest.raises(ValueError, match=r"per_image \['AUC'\] are not scores"):
        VesselMetric(per_image=["AUC"])
