"""run_single_ofat.sh, run_all_ofat.sh and tools/summarize_ofat.py end to end."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from rat_plugins.experiments import demo

from _helpers import REPO, TINY, run_cmd

BASELINE = "baseline_lr0.001_bs8_adamw_ep100"
NAMES = [
    "baseline_lr0.001_bs8_adamw_ep100",
    "ofat_lr0.01_bs8_adamw_ep100",
    "ofat_lr0.005_bs8_adamw_ep100",
    "ofat_lr0.001_bs16_adamw_ep100",
    "ofat_lr0.001_bs32_adamw_ep100",
    "ofat_lr0.001_bs8_sgd_ep100",
    "ofat_lr0.001_bs8_rmsprop_ep100",
    "ofat_lr0.001_bs8_adamw_ep150",
    "ofat_lr0.001_bs8_adamw_ep200",
]

# Stands in for the Python interpreter in run_all_ofat.sh tests: "trains" by writing the files a
# finished run leaves, and fails for the SGD config, so the orchestration is tested in seconds.
# Everything else (the summary table, the combined-best config) runs in the real interpreter. A run's
# best validation mAP@0.5 is its entry in SCORES (30 when not listed).
FAKE_PYTHON = """#!/usr/bin/env bash
case "$*" in *lazyconfig_train_net.py*) ;; *) exec {python} "$@" ;; esac
out=""; cfg=""
for a in "$@"; do
  case "$a" in train.output_dir=*) out="${{a#train.output_dir=}}" ;; --config-file) ;; *.py) cfg="$a" ;; esac
done
case "$cfg" in *sgd*) echo "simulated failure in $cfg" >&2; exit 3 ;; esac
score=30
{scores}
mkdir -p "$out" && echo "$@" >"$out/args.txt"
best='"best": {{"metric": "bbox/AP50", "value": '$score', "iteration": 9, "epoch": 5}}'
echo '{{"test": {{}}, '"$best"'}}' >"$out/final_metrics.json"
"""
SCORES = {"baseline": 40, "lr0.005": 50, "bs16": 45, "rmsprop": 44, "ep150": 41, "ep200": 39}


def _fake_python(tmp_path):
    path = tmp_path / "fake_python"
    scores = "\n".join(f'case "$cfg" in *{key}*) score={value} ;; esac' for key, value in SCORES.items())
    path.write_text(FAKE_PYTHON.format(python=sys.executable, scores=scores))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.mark.slow
def test_single_quick_run_trains_resumes_and_runs_in_background(heads_data, tmp_path):
    env = {"RAT_DATASETS": str(heads_data), "RAT_WORK_DIRS": str(tmp_path)}
    tiny = TINY + ["train.epochs=1", "dataloader.train.total_batch_size=4"]
    proc = run_cmd(["./run_single_ofat.sh", BASELINE, "--quick", *tiny], env=env)
    out = tmp_path / f"ofat_{BASELINE}_quick"
    assert "randomly initialised" in proc.stderr  # quick mode without ckpts/ warns
    for name in ("log.txt", "metrics.json", "model_final.pth", "final_metrics.json", "config.yaml"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    assert json.loads((out / "final_metrics.json").read_text())["max_iter"] == 2  # ceil(8 / 4) x 1

    again = run_cmd(["./run_single_ofat.sh", BASELINE, "--quick", *tiny], env=env)
    assert "resuming from model_final.pth" in again.stdout

    started = run_cmd(["./run_single_ofat.sh", "ofat_lr0.01_bs8_adamw_ep100", "--background", *tiny], env=env)
    bg = tmp_path / "ofat_ofat_lr0.01_bs8_adamw_ep100"
    assert f"tail -f {bg}/run.log" in started.stdout
    pid = int((bg / "run.pid").read_text())
    deadline = time.time() + 600
    while (
        time.time() < deadline and os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    ):
        time.sleep(1)
    assert (bg / "final_metrics.json").is_file(), (bg / "run.log").read_text()[-3000:]


def test_unknown_name_lists_the_configs(tmp_path):
    proc = run_cmd(["./run_single_ofat.sh", "baseline_lr0.1"], env={"RAT_WORK_DIRS": str(tmp_path)}, check=False)
    assert proc.returncode == 2
    assert "no OFAT config named 'baseline_lr0.1'" in proc.stderr and "ofat_lr0.01_bs8_adamw_ep100" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_run_all_skips_finished_continues_past_failures_and_reports(tmp_path):
    work = tmp_path / "work"
    done = work / "ofat_ofat_lr0.01_bs8_adamw_ep100"
    done.mkdir(parents=True)
    (done / "final_metrics.json").write_text("{}")
    proc = run_cmd(
        ["./run_all_ofat.sh", "--micro-batch", "2", "optimizer.lr=0.002"],
        check=False,
        env={"RAT_WORK_DIRS": str(work), "PYTHON": str(_fake_python(tmp_path))},
    )
    assert proc.returncode == 1  # one run failed
    assert "7 finished now, 1 finished before, 1 failed" in proc.stdout
    sgd = work / "ofat_ofat_lr0.001_bs8_sgd_ep100"
    assert f"FAILED:   ofat_lr0.001_bs8_sgd_ep100  (log: {sgd}/run.log)" in proc.stdout
    assert "simulated failure" in (sgd / "run.log").read_text()
    assert not (done / "args.txt").exists()  # skipped, not rerun
    ran = [n for n in NAMES if (work / f"ofat_{n}" / "args.txt").is_file()]
    assert len(ran) == 7 and "ofat_lr0.01_bs8_adamw_ep100" not in ran
    args = (work / f"ofat_{BASELINE}" / "args.txt").read_text().split()
    assert args[args.index("--micro-batch") + 1] == "2" and args[-1] == "optimizer.lr=0.002"  # user's last
    assert not list(work.glob("**/run.pid")) and not (work / ".run_all_ofat.pid").exists()
    assert (work / "ofat_summary.md").is_file() and "written: " in proc.stdout  # the table, at the end


def test_with_best_writes_the_combined_config_and_runs_it_tenth(heads_data, tmp_path, monkeypatch):
    """Each factor at its best validation level (SGD failed: left out), a LazyConfig inheriting the baseline."""
    from detectron2.config import LazyConfig

    monkeypatch.setenv("RAT_DATASETS", str(heads_data))  # the baseline config counts the training images

    work = tmp_path / "work"
    env = {"RAT_WORK_DIRS": str(work), "PYTHON": str(_fake_python(tmp_path))}
    proc = run_cmd(["./run_all_ofat.sh", "--with-best"], check=False, env=env)
    assert proc.returncode == 1 and "9 finished now, 0 finished before, 1 failed" in proc.stdout  # SGD
    assert "finished: best_combination" in proc.stdout
    best = work / "ofat_best_combination"
    config = best / "best_combination.py"
    args = (best / "args.txt").read_text().split()
    assert args[args.index("--config-file") + 1] == str(config) and f"train.output_dir={best}" in args
    text = config.read_text()
    assert "learning rate: 0.005 (validation mAP@0.5 0.001: 40.0, 0.005: 50.0, 0.01: 30.0)" in text
    assert "not finished, left out: ofat_lr0.001_bs8_sgd_ep100" in text
    cfg = LazyConfig.load(str(config))
    assert cfg.optimizer.lr == 0.005 and "RMSprop" in str(cfg.optimizer._target_)
    assert cfg.dataloader.train.total_batch_size == 16 and cfg.train.epochs == 150
    table = (work / "ofat_summary.md").read_text()
    assert "| best_combination | finished |" in table and table.count("| finished |") == 9
    # the baseline unfinished: no combination, one clear line
    (work / f"ofat_{BASELINE}" / "final_metrics.json").unlink()
    shutil.rmtree(best)
    proc = run_cmd(
        [sys.executable, "-m", "rat_plugins.experiments.ofat", "best-combination", "--work-dirs", str(work)],
        check=False,
    )
    assert proc.returncode == 2 and f"the baseline run {work / f'ofat_{BASELINE}'} has not finished" in proc.stderr
    proc = run_cmd(["./run_all_ofat.sh", "--with-best", "--submit"], check=False, env=env)
    assert proc.returncode == 2 and "--with-best does not go with --submit" in proc.stderr


def test_clean_stops_only_its_own_runs_and_keeps_originals(tmp_path):
    work = tmp_path / "work"
    data = tmp_path / "datasets"
    (data / "coco" / "train").mkdir(parents=True)
    original = data / "coco" / "train" / "_annotations.coco.json"
    original.write_text("{}")
    filtered = original.with_name("_annotations.coco_filtered.json")
    filtered.write_text("{}")
    run_dir = work / f"ofat_{BASELINE}"
    run_dir.mkdir(parents=True)
    # two look-alike training processes; only the one named in a PID file was started by the script
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)", "lazyconfig_train_net"]
    ours = subprocess.Popen(sleeper)
    bystander = subprocess.Popen(sleeper)
    try:
        (run_dir / "run.pid").write_text(str(ours.pid))
        env = {"RAT_WORK_DIRS": str(work), "RAT_DATASETS": str(data)}
        # without --yes it asks on the terminal; with none (a new session has no controlling one)
        # the answer is no
        refused = subprocess.run(
            ["./run_all_ofat.sh", "--clean"],
            cwd=REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            start_new_session=True,
        )
        assert refused.returncode == 1 and "nothing removed" in refused.stdout and run_dir.is_dir()
        proc = run_cmd(["./run_all_ofat.sh", "--clean", "--yes"], env=env)
        assert "cleaned" in proc.stdout
        assert ours.wait(timeout=30) == -signal.SIGTERM
        assert bystander.poll() is None
        assert not run_dir.exists() and not filtered.exists() and original.is_file()
    finally:
        for p in (ours, bystander):
            if p.poll() is None:
                p.kill()


QUICK_OVERRIDES = [  # what run_single_ofat.sh --quick passes, in this order
    "dataloader.image_size=128",
    "train.epochs=24",
    "train.warmup_iters=20",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "dataloader.final_test.num_workers=0",
    "train.log_period=5",
    "train.seed=0",
    "model.roi_heads.batch_size_per_image=32",
    "model.proposal_generator.post_nms_topk=[200,50]",
    "model.backbone.out_channels=64",
    "model.proposal_generator.head.in_channels=64",
    *(
        f"model.roi_heads.box_heads.{s}.{k}"
        for s in range(3)
        for k in ("conv_dims=[64,64,64,64]", "input_shape.channels=64")
    ),
]


def test_quick_overrides_are_one_python_list(tmp_path, monkeypatch):
    from rat_plugins.experiments.ofat import quick_overrides

    monkeypatch.delenv("RAT_QUICK_IMAGE_SIZE", raising=False)
    monkeypatch.delenv("RAT_QUICK_EPOCHS", raising=False)
    absent = tmp_path / "absent.pth"
    assert quick_overrides(pretrained=absent) == QUICK_OVERRIDES + ["model.backbone.net.checkpoint="]
    present = tmp_path / "vim.pth"
    present.write_bytes(b"")
    assert quick_overrides(pretrained=present) == QUICK_OVERRIDES
    monkeypatch.setenv("RAT_QUICK_IMAGE_SIZE", "96")
    monkeypatch.setenv("RAT_QUICK_EPOCHS", "3")
    assert quick_overrides(pretrained=present)[:2] == ["dataloader.image_size=96", "train.epochs=3"]
    assert quick_overrides(64, 48, pretrained=present)[:2] == ["dataloader.image_size=64", "train.epochs=48"]
    # the shell script reads the same list, one override per line
    proc = run_cmd(
        [sys.executable, "-m", "rat_plugins.experiments.ofat", "quick-overrides"],
        env={"RAT_QUICK_IMAGE_SIZE": "", "RAT_QUICK_EPOCHS": ""},
    )
    printed = proc.stdout.splitlines()
    assert printed[: len(QUICK_OVERRIDES)] == QUICK_OVERRIDES
    assert printed == quick_overrides(128, 24)


def _write_run(run_dir, evals, final=None, per_epoch=2):
    run_dir.mkdir(parents=True)
    lines = [{"iteration": i, "total_loss": 3.0 - 0.1 * i, "peak_memory_mb": 100.0 + i} for i in range(6)]
    lines += [{"iteration": it, "bbox/AP50": ap, "bbox/AP": ap / 2} for it, ap in evals]
    (run_dir / "metrics.json").write_text("\n".join(json.dumps(m) for m in lines) + "\n")
    (run_dir / "config.yaml").write_text(f"train:\n  eval_period: {per_epoch}\n")
    (run_dir / "log.txt").write_text("[d2.engine.hooks]: Total training time: 0:01:05 (0:00:01 on hooks)\n")
    if final is not None:
        (run_dir / "final_metrics.json").write_text(json.dumps({"test": {"bbox": final}}))


def test_summary_table_marks_missing_and_unfinished_runs(tmp_path):
    nan = float("nan")
    _write_run(
        tmp_path / f"ofat_{BASELINE}",
        [(1, nan), (3, 40.0), (5, 35.0)],
        final={"AP50": 41.25, "AP": 20.0, "APs": nan, "APm": 18.0, "APl": 30.0},
    )
    _write_run(tmp_path / "ofat_ofat_lr0.01_bs8_adamw_ep100", [(1, 5.0)])  # still training
    run_cmd([sys.executable, "tools/summarize_ofat.py", "--work-dirs", str(tmp_path)])
    table = (tmp_path / "ofat_summary.md").read_text().splitlines()
    row = {line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("|").split("|")] for line in table[2:]}
    # best epoch and validation score from the evaluations; no best model saved: its test columns blank
    expected = [BASELINE, "finished", "41.2", "20.0", "—", "18.0", "30.0", "0:01:05", "2", "40.0", "—", "—", "105"]
    assert row[BASELINE] == expected
    assert row["ofat_lr0.01_bs8_adamw_ep100"][1:3] == ["unfinished", "—"]  # no test figure, not 0
    assert row["ofat_lr0.001_bs8_sgd_ep100"][1:] == ["missing"] + ["—"] * 11
    assert len(row) == 9
    # only what ran (make demo): the two runs with a work dir, no "missing" rows
    run_cmd(
        [
            sys.executable,
            "tools/summarize_ofat.py",
            "--work-dirs",
            str(tmp_path),
            "--ran-only",
            "--out",
            str(tmp_path / "ran"),
        ]
    )
    ran = (tmp_path / "ran" / "ofat_summary.md").read_text()
    assert len(ran.splitlines()) == 4 and "missing" not in ran
    csv = (tmp_path / "ofat_summary.csv").read_text().splitlines()
    assert csv[0].startswith("experiment,status,mAP@0.5") and len(csv) == 10
    for png in ("ofat_loss.png", "ofat_val_map.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_loss_report_per_term():
    """make demo's summary: every loss term early vs late (the total alone can rise while learning)."""
    records = [
        {"iteration": i, "loss_cls": 1.0 - 0.1 * i, "loss_box_reg": 0.1 * i, "total_loss": 1.0} for i in range(10)
    ]
    report = demo.loss_report(records, window=2).splitlines()
    assert report[0].endswith("(0-1 / 8-9):")
    assert report[1].split() == ["loss_box_reg", "0.050", "->", "0.850"]
    assert report[2].split() == ["loss_cls", "0.950", "->", "0.150"]
    assert report[3].split() == ["total_loss", "1.000", "->", "1.000"]


def test_demo_verdict_states_each_claim():
    falling = [{"iteration": i, "total_loss": 3.0 - 0.1 * i} for i in range(20)]
    rising = [{"iteration": i, "total_loss": 1.0 + 0.1 * i} for i in range(20)]
    assert demo.verdict(falling, 0.0, 5.0) == (
        "total loss fell: yes (2.800 -> 1.300); test AP50 beat the untrained model: yes (0.0 -> 5.0)"
    )
    assert demo.verdict(rising, 2.0, 1.0) == (
        "total loss fell: NO (1.200 -> 2.700); test AP50 beat the untrained model: NO (2.0 -> 1.0)"
    )


def test_the_demo_sample_has_the_larger_heads_the_demo_promises(tmp_path):
    data = demo.write_demo_sample(tmp_path)
    doc = json.loads((data / "test" / "_annotations.coco.json").read_text())
    heights = [a["bbox"][3] for a in doc["annotations"]]
    assert heights and min(heights) >= 60 * 0.99 and max(heights) <= 240 * 1.01  # pixels at 640 (test: clean)
    before = (data / "test" / "_annotations.coco.json").read_bytes()
    assert (
        demo.write_demo_sample(tmp_path) == data and (data / "test" / "_annotations.coco.json").read_bytes() == before
    )
