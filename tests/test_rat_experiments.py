"""The RAT experiment chain: tools/run_rat_experiments.py --quick (train, test, collect) and
tools/evaluate_robustness.py (resolutions, spacing, degradation table, plot, memory refusal)."""

import csv
import json
import sys

import pytest
from mmengine.config import Config

import rat_plugins.mm  # noqa: F401
from rat_plugins.experiments.rat_study import quick_overrides
from rat_plugins.experiments.robustness import (
    estimate_eval_memory_gb,
    robustness_rows,
    set_eval_resolution,
    training_resolution,
)

from _helpers import REPO, run_cmd

CONFIGS = REPO / "projects" / "RAT" / "configs"
TRIPLE = CONFIGS / "rat_isic_triple_256-128-64.py"
RUNNER = [sys.executable, "tools/run_rat_experiments.py"]
ROBUSTNESS = [sys.executable, "tools/evaluate_robustness.py"]


def test_eval_memory_estimate_is_what_a_forward_holds(tmp_path):
    """Extrapolated from 128 and 256, the estimate at 384 bounds the measured peak of a 384 forward
    closely (a quick triple-scale model: chunked dense blocks, multi-resolution attention over three
    levels, UPerHead)."""
    import torch

    from rat_plugins.experiments.robustness import build_segmentor
    from rat_plugins.utils.live_memory import LiveTensorBytes

    cfg = quick_overrides(Config.fromfile(str(TRIPLE)), tmp_path)
    estimate = estimate_eval_memory_gb(cfg.model, 384)
    model = build_segmentor(cfg.model).eval()
    with torch.no_grad(), LiveTensorBytes() as memory:
        model(torch.zeros(1, 3, 384, 384), mode="tensor")
    assert memory.peak / 1e9 <= estimate <= 1.5 * memory.peak / 1e9  # an upper bound, and a close one
    assert estimate_eval_memory_gb(cfg.model, 384, batch=2) == pytest.approx(2 * estimate, rel=0.02)


def test_eval_resolution_scales_spacing_and_inputs():
    cfg = Config.fromfile(str(TRIPLE))
    assert training_resolution(cfg) == 256
    assert set_eval_resolution(cfg, 512, 256) == 0.5  # twice the pixels over the same extent
    assert cfg.test_dataloader.dataset.pipeline[1].scale == (512, 512)
    cfg.model.backbone.spacing = [2.0, 4.0]
    set_eval_resolution(cfg, 128, 256)
    assert cfg.model.backbone.spacing == [4.0, 8.0]
    quick = quick_overrides(Config.fromfile(str(TRIPLE)), "unused", size=48, iters=5)
    assert training_resolution(quick) == 48 and quick.model.backbone.feature_dims == 32


def test_degradation_against_the_training_resolution():
    rows = [
        dict(resolution=r, train_resolution=64, status="ok", Dice=d, IoU=50.0)
        for r, d in ((32, 72.0), (64, 80.0), (128, 76.0))
    ]
    rows.append(dict(resolution=1024, train_resolution=64, status="not run: dense attention"))
    out = robustness_rows(rows)
    assert [r.get("Dice_degradation_pct") for r in out] == [10.0, 0.0, 5.0, None]
    assert [r.get("within_limit") for r in out] == [True, True, True, None]
    assert out[0]["IoU_degradation_pct"] == 0.0
    out = robustness_rows([dict(rows[0], Dice=71.9), rows[1]])
    assert out[0]["within_limit"] is False


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The segmentation group and robustness in quick mode, 3 iterations per model."""
    work = tmp_path_factory.mktemp("rat_quick")
    proc = run_cmd(
        RUNNER
        + [
            "segmentation",
            "robustness",
            "--quick",
            "--iters",
            "3",
            "--resolutions",
            "32",
            "96",
            "--work-dir",
            str(work),
        ],
        timeout=900,
        env={"RAT_TRACKING": "1", "MLFLOW_TRACKING_URI": ""},
    )
    return work, proc


@pytest.mark.slow
def test_quick_chain_trains_tests_and_collects(quick_run):
    work, proc = quick_run
    assert (work / "datasets" / "isic2018" / "ISIC2018_Task1-2_Training_Input").is_dir()
    results = _read_csv(work / "results.csv")
    assert [r["experiment"] for r in results] == [
        "rat_isic_dual_256-128",
        "rat_isic_single_256",
        "rat_isic_triple_256-128-64",
    ]
    for row in results:
        assert row["group"] == "segmentation" and row["status"] == "ok" and row["iters"] == "3"
        assert 0 <= float(row["Dice"]) <= 100 and 0 <= float(row["Specificity"]) <= 100
        result = json.loads((work / "segmentation" / row["experiment"] / "result.json").read_text())
        assert result["checkpoint"].endswith(".pth") and float(row["Dice"]) == pytest.approx(result["Dice"], abs=0.01)
    # the triple-scale model really ran on three levels
    run_cfg = Config.fromfile(
        json.loads((work / "segmentation" / "rat_isic_triple_256-128-64" / "result.json").read_text())["run_config"]
    )
    assert run_cfg.model.backbone.scales == (1.0, 0.5, 0.25) and run_cfg.train_cfg.max_iters == 3
    table = _read_csv(work / "robustness.csv")
    assert [(r["experiment"], r["resolution"]) for r in table] == [
        (name, res)
        for name in ("rat_isic_single_256", "rat_isic_dual_256-128", "rat_isic_triple_256-128-64")
        for res in ("32", "64", "96")
    ]  # the training resolution (64) is always evaluated
    for r in table:
        assert r["status"] == "ok"
        assert float(r["spacing"]) == pytest.approx(64 / int(r["resolution"]))
        if r["resolution"] == "64":
            assert float(r["Dice_degradation_pct"]) == 0.0
    assert (work / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RAT on ISIC 2018 (quick mode" in (work / "results.md").read_text()
    # a second call skips what is done
    again = run_cmd(RUNNER + ["segmentation", "--quick", "--work-dir", str(work)])
    assert again.stdout.count("done before, skipped") == 3


@pytest.mark.slow
def test_results_table_from_the_mlflow_store(quick_run, tmp_path):
    work, _ = quick_run
    store = f"sqlite:///{work / 'mlflow.db'}"
    run_cmd(RUNNER + ["segmentation", "--quick", "--work-dir", str(tmp_path), "--mlflow", store])
    from_store, from_files = _read_csv(tmp_path / "results.csv"), _read_csv(work / "results.csv")
    assert [r["experiment"] for r in from_store] == [r["experiment"] for r in from_files]
    for stored, filed in zip(from_store, from_files):
        assert stored["status"] == "ok" and stored["iters"] == filed["iters"] == "3"
        assert stored["checkpoint"] == filed["checkpoint"]
        for metric in ("Dice", "IoU", "Sensitivity", "Specificity", "train_seconds"):
            assert float(stored[metric]) == pytest.approx(float(filed[metric]), abs=0.01), metric
    missing = run_cmd(
        RUNNER + ["segmentation", "--work-dir", str(tmp_path), "--mlflow", f"sqlite:///{tmp_path / 'none.db'}"],
        check=False,
    )
    assert missing.returncode == 2 and "no 'RAT ISIC' experiment in the MLflow store" in missing.stderr
    # the study's tables and plot: the artifacts of its run 'summary'
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("RAT ISIC").experiment_id
    summary = client.search_runs([experiment], "attributes.run_name = 'summary'")
    assert len(summary) == 1 and summary[0].data.tags["rat.summary"] == "true"
    names = {a.path for a in client.list_artifacts(summary[0].info.run_id)}
    assert {"results.md", "results.csv", "robustness.md", "robustness.csv", "robustness.png"} <= names


@pytest.mark.slow
def test_evaluate_robustness_cli(quick_run, tmp_path):
    work, _ = quick_run
    result = json.loads((work / "segmentation" / "rat_isic_single_256" / "result.json").read_text())
    out = tmp_path / "rob"
    proc = run_cmd(
        ROBUSTNESS
        + [
            "--config",
            result["run_config"],
            "--checkpoint",
            result["checkpoint"],
            "--resolutions",
            "48",
            "128",
            "--out",
            str(out),
        ]
    )
    rows = _read_csv(out / "robustness.csv")
    assert [r["resolution"] for r in rows] == ["48", "64", "128"] and all(r["status"] == "ok" for r in rows)
    ref = float(rows[1]["Dice"])
    for r in rows:
        want = 100 * (ref - float(r["Dice"])) / ref if ref else None
        if want is not None:
            assert float(r["Dice_degradation_pct"]) == pytest.approx(want, abs=0.01)
            assert r["within_limit"] == str(want <= 10.0)
    assert "criterion" in proc.stdout and (out / "robustness.png").is_file() and (out / "robustness.md").is_file()
    # the model's test Dice at the training resolution is the quick run's own test result
    assert ref == pytest.approx(result["Dice"], abs=0.01)

    # a resolution whose dense attention exceeds the budget is reported, not attempted
    proc = run_cmd(
        ROBUSTNESS
        + [
            "--config",
            result["run_config"],
            "--checkpoint",
            result["checkpoint"],
            "--resolutions",
            "128",
            "--max-memory-gb",
            "0.0001",
            "--out",
            str(out),
        ],
        check=False,
    )
    assert proc.returncode == 1
    rows = _read_csv(out / "robustness.csv")
    assert all(r["status"].startswith("not run: a test forward at ") for r in rows)
    assert "GB of tensors (budget 0.0001 GB, --max-memory-gb)" in rows[0]["status"]


def test_robustness_cli_bad_input(tmp_path):
    proc = run_cmd(
        ROBUSTNESS + ["--config", str(TRIPLE), "--checkpoint", str(tmp_path / "missing.pth"), "--resolutions", "128"],
        check=False,
    )
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cmd(RUNNER + ["robustness", "--quick", "--work-dir", str(tmp_path / "empty")], check=False)
    assert proc.returncode == 1 and "run the segmentation group first" in proc.stderr


@pytest.mark.slow
def test_ray_evaluate_spreads_the_resolutions_and_writes_the_single_process_table(quick_run, tmp_path):
    work, _ = quick_run
    result = json.loads((work / "segmentation" / "rat_isic_single_256" / "result.json").read_text())
    model = [result["run_config"], result["checkpoint"]]
    common = ["--resolutions", "32", "96"]
    run_cmd(ROBUSTNESS + ["--config", model[0], "--checkpoint", model[1], *common, "--out", str(tmp_path / "one")])
    ray = [sys.executable, "tools/ray_evaluate.py", *model, "--robustness", *common, "--num-workers", "2"]
    proc = run_cmd(ray + ["--out", str(tmp_path / "ray")])
    spread, single = _read_csv(tmp_path / "ray" / "robustness.csv"), _read_csv(tmp_path / "one" / "robustness.csv")
    for rows in (spread, single):  # the time taken differs from run to run, and the estimate by caches
        for row in rows:
            row["memory_gb"] = round(float(row.pop("memory_gb")), 2)
            assert float(row.pop("seconds")) > 0
    assert spread == single
    assert "criterion" in proc.stdout and (tmp_path / "ray" / "robustness.png").is_file()
    refused = run_cmd(ray[:4] + ["--out", str(tmp_path / "x")], check=False)
    assert refused.returncode == 2 and "give --robustness" in refused.stderr
