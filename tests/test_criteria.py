"""The RAT study's literature baselines and success criteria (rat_plugins.experiments.criteria)."""

import json

from rat_plugins.experiments.criteria import criteria_lines, write_criteria


def test_verdicts_name_the_numbers_and_the_criterion():
    rows = [
        {"experiment": "rat_isic_single_256", "status": "ok", "Dice": 85.0},
        {"experiment": "rat_isic_triple_256-128-64", "status": "ok", "Dice": 89.0},
        {"experiment": "broken", "status": "failed"},
    ]
    robustness = [
        {"experiment": "rat_isic_triple_256-128-64", "resolution": "512", "Dice_degradation_pct": "4.0"},
        {"experiment": "rat_isic_single_256", "resolution": "1024", "Dice_degradation_pct": "12.5"},
        {"experiment": "rat_isic_single_256", "resolution": "1024", "Dice_degradation_pct": ""},  # not run
    ]
    seg, det, rob = criteria_lines(rows, robustness, {"bbox": {"APs": 34.0}}, synthetic=False)
    # 0.890 / 0.863 (Swin-UNet, the best baseline) - 1 = +3.1 %: the criterion holds, the stretch does not
    assert seg.startswith("- segmentation (ISIC 2018 Dice, rat_isic_triple_256-128-64): PASS (stretch FAIL)")
    assert "0.890 against Swin-UNet's 0.863 is +3.1 %" in seg
    assert det.startswith("- detection (COCO AP_small): PASS (stretch FAIL)") and "YOLOv8's 31.8 is +6.9 %" in det
    assert rob.startswith("- robustness (Dice degradation): FAIL: the largest is 12.5 %")
    assert "rat_isic_single_256 at 1024x1024" in rob
    seg, det, _ = criteria_lines([dict(rows[0], Dice=80.0)], [], None, synthetic=False)
    assert "FAIL (stretch FAIL)" in seg and "-7.3 %" in seg
    assert "not evaluated: no COCO run given" in det


def test_synthetic_results_are_never_compared_with_the_literature(tmp_path):
    rows = [{"experiment": "rat_isic_single_256", "status": "ok", "Dice": 99.0}]
    text = write_criteria(tmp_path, rows, synthetic=True)
    assert "Synthetic data (quick mode)" in text and "PASS" not in text and "Swin-UNet" not in text
    coco = tmp_path / "final_metrics.json"
    coco.write_text(json.dumps({"test": {"bbox": {"APs": 20.0, "AP": 40.0}}}))
    (tmp_path / "robustness.csv").write_text(
        "experiment,resolution,Dice_degradation_pct\nrat_isic_single_256,512,3.0\n"
    )
    text = write_criteria(tmp_path, rows, synthetic=False, coco_results=coco)
    assert "detection (COCO AP_small): FAIL" in text and "robustness (Dice degradation): PASS" in text
    assert "| ISIC 2018 | Swin-UNet | 0.863 | 0.781 | | |" in text and "| COCO | YOLOv8 | | | 50.2 | 31.8 |" in text
    assert (tmp_path / "criteria.md").read_text() == text
