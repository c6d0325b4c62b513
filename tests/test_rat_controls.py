"""The RAT study's positive controls (tools/run_rat_controls.py): the verdicts by hand, and both
controls run end to end through the study's own step (configs, ISIC-layout data on disk, mmseg
runner, best checkpoint, test split) in a few iterations."""

import json
import sys

import pytest

from rat_plugins.experiments.controls import context_verdict, run_context_control, run_spacing_control, spacing_verdict

from _helpers import run_cmd


def test_context_verdict_by_hand():
    summary = context_verdict({"single": [50.0, 54.0, 52.0], "triple": [80.0, 84.0, 85.0]})
    assert summary["single"]["mean"] == pytest.approx(52.0) and summary["single"]["std"] == pytest.approx(2.0)
    assert summary["gap"] == pytest.approx(31.0) and summary["spread"] == pytest.approx(2.0 + 2.6458, abs=1e-3)
    assert summary["passed"]
    assert not context_verdict({"single": [50.0, 70.0, 60.0], "triple": [62.0, 80.0, 71.0]})["passed"]  # within
    assert not context_verdict({"single": [50.0, 51.0], "triple": [90.0, 91.0]})["passed"]  # two seeds


def test_spacing_verdict_by_hand():
    rows = [
        {"spacing_scaled": True, "Dice_degradation_pct": 4.0},
        {"spacing_scaled": True, "Dice_degradation_pct": 8.0},
        {"spacing_scaled": False, "Dice_degradation_pct": 40.0},
        {"spacing_scaled": False, "Dice_degradation_pct": 50.0},
    ]
    summary = spacing_verdict(rows)
    assert summary["scaled"]["mean"] == 6.0 and summary["kept"]["mean"] == 45.0 and summary["passed"]
    rows[1]["Dice_degradation_pct"] = 20.0  # scaled misses the 10 % criterion
    assert not spacing_verdict(rows)["passed"]


def test_controls_cli_needs_three_seeds(tmp_path):
    proc = run_cmd(
        [sys.executable, "tools/run_rat_controls.py", "--seeds", "0", "1", "--work-dir", str(tmp_path)], check=False
    )
    assert proc.returncode == 2 and "at least 3 seeds" in proc.stderr


@pytest.mark.slow
def test_context_control_runs_every_seed_through_the_study_pipeline(tmp_path):
    """The machinery, in a few iterations: both configs at three seeds, trained, tested, tabled. (The
    effect itself is not asserted: at the iterations a CPU allows, neither model learns the ring
    rule yet; see the README.)"""
    summary = run_context_control(tmp_path, seeds=(0, 1, 2), iters=10)
    assert len(summary["single"]["dice"]) == len(summary["triple"]["dice"]) == 3
    assert summary["gap"] == pytest.approx(summary["triple"]["mean"] - summary["single"]["mean"])
    table = (tmp_path / "context_control.md").read_text()
    assert "Context control (3 seeds, 10 iterations)" in table and table.count("| triple |") == 4
    for seed in (0, 1, 2):
        for name in ("context_single_96", "context_triple_96"):
            result = json.loads((tmp_path / "context" / "controls" / f"seed{seed}" / name / "result.json").read_text())
            assert result["iters"] == 10 and "Dice_per_image" in result


@pytest.mark.slow
def test_spacing_control_tests_twice_the_resolution_with_and_without_scaling(tmp_path):
    """The machinery: trained at 64, each seed's model tested at 128 with the spacing halved and kept."""
    summary = run_spacing_control(tmp_path, seeds=(0, 1, 2), iters=10)
    assert len(summary["scaled"]["degradation_pct"]) == len(summary["kept"]["degradation_pct"]) == 3
    rows = (tmp_path / "spacing_control.csv").read_text().splitlines()
    assert rows[0].startswith("seed,resolution,spacing_scaled,spacing") and len(rows) == 7
    spacings = {line.split(",")[2]: line.split(",")[3] for line in rows[1:]}
    assert spacings == {"True": "0.5", "False": "1.0"}
