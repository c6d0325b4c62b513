"""The RAT study's literature baselines and success criteria, evaluated on its results.

Segmentation (ISIC 2018): RAT's best Dice at least 2 % above the best baseline's (stretch 5 %);
detection (COCO): AP_small at least 5 % above the best baseline's (stretch 10 %); robustness: at most
10 % Dice degradation at any resolution. Improvements are relative (``ours / best baseline - 1``).
Results on synthetic data (quick mode) are labelled as such and never compared with the literature.
"""

import csv
import json
from pathlib import Path
from typing import List, Optional, Sequence

from rat_plugins.utils.atomic import atomic_write_text

from .robustness import DEGRADATION_LIMIT_PCT

__all__ = ["ISIC_BASELINES", "COCO_BASELINES", "criteria_lines", "baselines_table", "write_criteria"]

# (method, Dice, IoU) on ISIC 2018 Task 1, as fractions
ISIC_BASELINES = [("U-Net", 0.847, 0.765), ("Swin-UNet", 0.863, 0.781), ("TransUNet", 0.855, 0.773)]
# (method, mAP, AP_small) on COCO val2017, in percent
COCO_BASELINES = [("DETR", 42.0, 20.5), ("YOLOv8", 50.2, 31.8)]
SEGMENTATION_GAIN_PCT, SEGMENTATION_STRETCH_PCT = 2.0, 5.0
DETECTION_GAIN_PCT, DETECTION_STRETCH_PCT = 5.0, 10.0


def baselines_table() -> str:
    lines = ["| dataset | method | Dice | IoU | mAP | AP_small |", "|---|---|---|---|---|---|"]
    lines += [f"| ISIC 2018 | {m} | {d:.3f} | {i:.3f} | | |" for m, d, i in ISIC_BASELINES]
    lines += [f"| COCO | {m} | | | {ap:.1f} | {aps:.1f} |" for m, ap, aps in COCO_BASELINES]
    return "\n".join(lines) + "\n"


def _gain_line(label: str, ours: float, best_name: str, best: float, gain: float, stretch: float, digits: int) -> str:
    change = (ours / best - 1.0) * 100.0
    verdict = "PASS" if change >= gain else "FAIL"
    stretched = "PASS" if change >= stretch else "FAIL"
    return (
        f"- {label}: {verdict} (stretch {stretched}): {ours:.{digits}f} against {best_name}'s {best:.{digits}f} "
        f"is {change:+.1f} % (criterion >= {gain:g} %, stretch >= {stretch:g} %)"
    )


def segmentation_line(rows: Sequence[dict]) -> str:
    """The segmentation criterion on the study's rows (Dice in percent, as the metric reports it)."""
    scored = [r for r in rows if r.get("status") == "ok" and r.get("Dice") is not None]
    if not scored:
        return "- segmentation (ISIC 2018 Dice): not evaluated: no tested segmentation run"
    best_row = max(scored, key=lambda r: float(r["Dice"]))
    name, dice, _ = max(ISIC_BASELINES, key=lambda b: b[1])
    label = f"segmentation (ISIC 2018 Dice, {best_row['experiment']})"
    return _gain_line(
        label, float(best_row["Dice"]) / 100.0, name, dice, SEGMENTATION_GAIN_PCT, SEGMENTATION_STRETCH_PCT, 3
    )


def detection_line(coco_test: Optional[dict]) -> str:
    """The detection criterion on a COCO run's test metrics (``{'bbox': {'APs': ...}}``), or why not."""
    aps = ((coco_test or {}).get("bbox") or {}).get("APs")
    if aps is None or aps != aps:
        return "- detection (COCO AP_small): not evaluated: no COCO run given (--coco-results FINAL_METRICS_JSON)"
    name, _, best = max(COCO_BASELINES, key=lambda b: b[2])
    return _gain_line("detection (COCO AP_small)", float(aps), name, best, DETECTION_GAIN_PCT, DETECTION_STRETCH_PCT, 1)


def robustness_line(rows: Sequence[dict]) -> str:
    judged = [r for r in rows if r.get("Dice_degradation_pct") not in (None, "")]
    if not judged:
        return "- robustness (Dice degradation): not evaluated: no robustness rows"
    worst = max(judged, key=lambda r: float(r["Dice_degradation_pct"]))
    verdict = "PASS" if float(worst["Dice_degradation_pct"]) <= DEGRADATION_LIMIT_PCT else "FAIL"
    return (
        f"- robustness (Dice degradation): {verdict}: the largest is {float(worst['Dice_degradation_pct']):.1f} % "
        f"({worst['experiment']} at {worst['resolution']}x{worst['resolution']}; criterion <= "
        f"{DEGRADATION_LIMIT_PCT:g} %)"
    )


def criteria_lines(
    rows: Sequence[dict], robustness: Sequence[dict], coco_test: Optional[dict], synthetic: bool
) -> List[str]:
    """The study's verdicts, one line each; on synthetic data the one line that says why there are none."""
    if synthetic:
        return [
            "Synthetic data (quick mode): these figures show that the pipeline runs; they are not compared "
            "with the literature baselines and the success criteria are not evaluated."
        ]
    return [segmentation_line(rows), detection_line(coco_test), robustness_line(robustness)]


def write_criteria(work_dir: Path, rows: Sequence[dict], synthetic: bool, coco_results: Optional[Path] = None) -> str:
    """``<work_dir>/criteria.md``: the literature baselines and the verdicts on ``rows`` (the results table),
    the work dir's ``robustness.csv`` and a COCO run's ``final_metrics.json``. Returns the Markdown."""
    work_dir = Path(work_dir)
    robustness = []
    if (work_dir / "robustness.csv").is_file():
        with open(work_dir / "robustness.csv", newline="") as f:
            robustness = list(csv.DictReader(f))
    coco = json.loads(Path(coco_results).read_text()).get("test") if coco_results else None
    lines = ["## Success criteria", ""] + criteria_lines(rows, robustness, coco, synthetic)
    if not synthetic:
        lines += ["", "Literature baselines:", "", baselines_table()]
    markdown = "\n".join(lines).rstrip("\n") + "\n"
    atomic_write_text(work_dir / "criteria.md", markdown)
    return markdown
