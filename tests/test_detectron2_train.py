"""OFAT configs through the project's and detectron2's stock lazyconfig_train_net.py (tiny sizes)."""

import json
import sys

import pytest

from _helpers import REPO, TINY, detectron2_stock_tool as stock_tool, run_cmd

OFAT = REPO / "projects/ViTDet/configs/OFAT"
BASELINE = OFAT / "baseline_lr0.001_bs8_adamw_ep100.py"


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]


@pytest.mark.slow
def test_baseline_trains_under_project_tool_and_resumes(heads_data, tmp_path):
    out = tmp_path / "run"
    env = {"RAT_DATASETS": str(heads_data)}
    args = [
        sys.executable,
        "tools/lazyconfig_train_net.py",
        "--config-file",
        str(BASELINE),
        *TINY,
        "train.epochs=1",
        "dataloader.train.total_batch_size=2",
        "train.warmup_iters=1",
        f"train.output_dir={out}",
    ]
    run_cmd(args, env=env)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["max_iter"] == 4  # ceil(8 train images / batch 2) x 1 epoch
    assert "AP50" in final["test"]["bbox"]
    assert (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    record = json.loads((out / "run_config.json").read_text())
    assert record["config"]["train.epochs"] == 1 and record["reproducibility"]["seed"] == 0
    # resuming the finished run: nothing left to train, the final test again
    run_cmd(args[:2] + ["--resume"] + args[2:], env=env)
    assert "Starting training from iteration 4" in (out / "log.txt").read_text()
    assert [m["iteration"] for m in _metrics(out) if "total_loss" in m] == [0, 1, 2, 3]
    # one more epoch is another config: refused, naming the keys, nothing trained
    refused = run_cmd(args[:2] + ["--resume"] + args[2:] + ["train.epochs=2"], env=env, check=False)
    assert (
        refused.returncode == 2
        and "train.epochs: 1 -> 2" in refused.stderr
        and "train.max_iter: 4 -> 8" in refused.stderr
    )
    assert json.loads((out / "final_metrics.json").read_text())["max_iter"] == 4
    # its own checkpoint loads strictly for evaluation
    evaluated = tmp_path / "eval"
    run_cmd(
        args[:2]
        + ["--eval-only"]
        + args[2:]
        + [f"train.init_checkpoint={out}/model_final.pth", f"train.output_dir={evaluated}"],
        env=env,
    )
    assert "AP50" in json.loads((evaluated / "eval_metrics.json").read_text())["test"]["bbox"]


@pytest.mark.slow
def test_baseline_trains_under_stock_detectron2_tool(heads_data, tmp_path):
    out = tmp_path / "stock"
    run_cmd(
        [
            sys.executable,
            str(stock_tool()),
            "--config-file",
            str(BASELINE),
            *TINY,
            "train.max_iter=3",
            "train.eval_period=3",
            "train.checkpointer.period=3",
            "dataloader.train.total_batch_size=2",
            f"train.output_dir={out}",
        ],
        env={"RAT_DATASETS": str(heads_data)},
    )
    assert (out / "model_final.pth").is_file()
    losses = [m for m in _metrics(out) if "total_loss" in m]
    assert [m["iteration"] for m in losses] == [0, 1, 2]
    assert any("bbox/AP50" in m for m in _metrics(out))  # evaluated on head_detection_valid


@pytest.mark.slow
def test_two_cpu_processes_with_micro_batches(heads_data, tmp_path):
    out = tmp_path / "ddp"
    proc = run_cmd(
        [
            sys.executable,
            "tools/lazyconfig_train_net.py",
            "--num-gpus",
            "2",
            "--micro-batch",
            "1",
            "--config-file",
            str(BASELINE),
            *TINY,
            "train.epochs=2",
            "dataloader.train.total_batch_size=4",
            "train.warmup_iters=1",
            f"train.output_dir={out}",
        ],
        env={"RAT_DATASETS": str(heads_data)},
    )
    log = (out / "log.txt").read_text()
    assert "Gradient accumulation: 2 micro-batches of 2 images (all processes) per optimizer step" in log, proc.stdout[
        -2000:
    ]
    assert json.loads((out / "final_metrics.json").read_text())["max_iter"] == 4  # ceil(8/4) x 2 epochs


def test_unknown_override_is_one_clear_error(heads_data):
    proc = run_cmd(
        [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", str(BASELINE), "train.max_itr=3"],
        env={"RAT_DATASETS": str(heads_data)},
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown config key 'train.max_itr'" in proc.stderr and "train.max_iter" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_dataset_is_one_clear_error(tmp_path):
    proc = run_cmd(
        [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", str(BASELINE)],
        env={"RAT_DATASETS": str(tmp_path)},
        check=False,
    )
    assert proc.returncode != 0
    assert "_annotations.coco.json" in proc.stderr and "synthetic heads" in proc.stderr


def test_all_ofat_configs_build_with_their_schedules(heads_data, monkeypatch):
    from detectron2.config import LazyConfig

    monkeypatch.setenv("RAT_DATASETS", str(heads_data))
    expected = {"bs8": 8, "bs16": 16, "bs32": 32}
    names = sorted(p.name for p in OFAT.glob("*.py"))
    assert len(names) == 9
    for name in names:
        cfg = LazyConfig.load(str(OFAT / name))
        lr, bs, opt, ep = name[:-3].split("_")[1:]
        assert cfg.optimizer.lr == float(lr[2:])
        assert cfg.dataloader.train.total_batch_size == expected[bs]
        assert cfg.optimizer._target_.__name__.lower() == opt
        assert cfg.train.epochs == int(ep[2:])
        per_epoch = -(-8 // expected[bs])
        assert cfg.train.max_iter == per_epoch * int(ep[2:]) and cfg.train.eval_period == per_epoch
        assert cfg.model.backbone.net.frozen is True
        assert cfg.model.roi_heads.num_classes == 1


OTHER_OFAT = sorted(p.stem for p in OFAT.glob("ofat_*.py"))
# Every variant under both tools (the baseline runs under both above): ~20 s a fresh process each.
VARIANT_RUNS = [(name, tool) for name in OTHER_OFAT for tool in ("project", "stock")]


@pytest.mark.slow
@pytest.mark.parametrize("name, tool", VARIANT_RUNS)
def test_every_ofat_variant_trains(heads_data, tmp_path, name, tool):
    """Each OFAT variant (optimizer, batch, lr, epochs) instantiates and takes optimizer steps."""
    script = REPO / "tools/lazyconfig_train_net.py" if tool == "project" else stock_tool()
    short = (
        ["train.epochs=1"]
        if tool == "project"
        else ["train.max_iter=2", "train.eval_period=2", "train.checkpointer.period=2"]
    )
    run_cmd(
        [
            sys.executable,
            str(script),
            "--config-file",
            str(OFAT / f"{name}.py"),
            *TINY,
            *short,
            "train.warmup_iters=1",
            f"train.output_dir={tmp_path}",
        ],
        env={"RAT_DATASETS": str(heads_data)},
    )
    losses = [m for m in _metrics(tmp_path) if "total_loss" in m]
    assert losses and all(m["total_loss"] == m["total_loss"] for m in losses)  # trained, no NaN
    assert (tmp_path / "model_final.pth").is_file()
