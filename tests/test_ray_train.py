"""Ray Train as the engine (tools/ray_train.py): 2 CPU workers on a Ray of this machine, each running
tools/train.py as one rank; a killed worker's group is restarted by Ray and the run resumes from its
last checkpoint, ending with the weights of an uninterrupted plain 2-process run."""

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from _helpers import REPO, assert_same_weights, run_cmd

SETR = REPO / "projects" / "SETR" / "configs" / "setr_vit-s16_mla_fundus.py"


def test_refusals(tmp_path):
    proc = run_cmd([sys.executable, "tools/ray_train.py", str(SETR), "--num-workers", "0"], check=False)
    assert proc.returncode == 2 and "--num-workers must be >= 1" in proc.stderr
    proc = run_cmd([sys.executable, "tools/ray_train.py", str(tmp_path / "none.py"), "--num-workers", "1"], check=False)
    assert proc.returncode == 2 and "config not found" in proc.stderr


def _training_process(work: Path, rank: int) -> int:
    """The pid of tools/train.py of ``rank`` in ``work`` (read from /proc: no process library needed)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tools/train.py" in cmdline and str(work).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no training process of rank {rank} in {work}")


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_resumes_from_its_checkpoint(fundus_data, tmp_path):
    from bad_inputs.test_bad_mm_runs import LONG, Background
    from test_setr import cfg_options

    env = {"RAT_DATASETS": str(fundus_data), "RAT_PLUGINS_SCAN_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    short = dict(LONG, train_cfg__max_iters=30, param_scheduler__0__end=30, train_cfg__val_interval=30)
    options = cfg_options(**dict(short, default_hooks__checkpoint__interval=5))
    work = tmp_path / "ray"
    args = [sys.executable, "tools/ray_train.py", str(SETR), "--num-workers", "2", "--max-failures", "1"]
    run = Background(args + ["--work-dir", str(work), *options], env, tmp_path / "ray.log")
    run.wait_for(r"Iter\(train\) \[\s*12/", timeout=300)  # past the checkpoint of iteration 10
    os.kill(_training_process(work, 1), signal.SIGKILL)
    assert run.finish(timeout=600) == 0, run.text()[-4000:]
    log = run.text()
    resumed = [int(n) for n in re.findall(r"resumed epoch: 0, iter: (\d+)", log)]
    assert resumed and min(resumed) >= 10, "the restarted group must resume from a checkpoint, not from zero"
    assert "ray_train: finished" in log
    whole = tmp_path / "plain"
    run_cmd(["bash", "tools/dist_train.sh", str(SETR), "2", "--work-dir", str(whole), *options], env=env)
    assert_same_weights(work / "iter_30.pth", whole / "iter_30.pth", key="state_dict")


def _detectron2_machine(out: Path, machine_rank: int) -> int:
    """The pid of tools/lazyconfig_train_net.py as machine ``machine_rank`` of the run into ``out``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "tools/lazyconfig_train_net.py" in cmdline and f"train.output_dir={out}" in cmdline:
            if cmdline[cmdline.index("--machine-rank") + 1] == str(machine_rank):
                return int(entry.name)
    raise AssertionError(f"no detectron2 machine {machine_rank} training into {out}")


@pytest.mark.slow
def test_a_killed_lazyconfig_worker_is_restarted_and_ends_as_two_plain_processes(heads_data, tmp_path):
    """Each worker runs tools/lazyconfig_train_net.py as one machine of two (detectron2's own launch);
    machine 1 killed mid-run: Ray restarts the group, which resumes from the last checkpoint and ends
    with the weights of an uninterrupted plain 2-process run."""
    from bad_inputs.test_bad_detectron2_runs import BASELINE, SMALL, _trained_iterations
    from bad_inputs.test_bad_mm_runs import Background

    env = {"RAT_DATASETS": str(heads_data), "OMP_NUM_THREADS": "1"}
    # 8 training images, 4 a step: 2 iterations an epoch, a checkpoint each epoch, 24 iterations
    schedule = [*SMALL, "dataloader.train.total_batch_size=4", "train.epochs=12", "train.eval_period=1000"]
    out = tmp_path / "ray"
    args = [sys.executable, "tools/ray_train.py", str(BASELINE), "--num-workers", "2", "--max-failures", "1"]
    run = Background(args + [*schedule, f"train.output_dir={out}"], env, tmp_path / "ray.log")
    deadline = time.time() + 300
    while not ((out / "model_0000007.pth").is_file() and len(_trained_iterations(out)) >= 10):
        assert time.time() < deadline and run.proc.poll() is None, run.text()[-4000:]
        time.sleep(0.2)
    os.kill(_detectron2_machine(out, 1), signal.SIGKILL)
    assert run.finish(timeout=600) == 0, run.text()[-4000:]
    assert "ray_train: finished" in run.text()
    starts = [int(n) for n in re.findall(r"Starting training from iteration (\d+)", (out / "log.txt").read_text())]
    assert starts[0] == 0 and len(starts) >= 2 and min(starts[1:]) >= 8, starts
    whole = tmp_path / "plain"
    plain = [sys.executable, "tools/lazyconfig_train_net.py", "--num-gpus", "2", "--config-file", str(BASELINE)]
    run_cmd(plain + [*schedule, f"train.output_dir={whole}"], env=env)
    assert_same_weights(out / "model_final.pth", whole / "model_final.pth", key="model")


@pytest.mark.slow
def test_the_ofat_test_evaluations_as_ray_tasks_give_the_summary_table(heads_data, tmp_path):
    """tools/ray_evaluate.py --ofat: each run's final and best models on the test split, one Ray task each,
    through the training tool's --eval-only; the table equals tools/summarize_ofat.py's, which reads the
    figures the trainings wrote."""
    from bad_inputs.test_bad_detectron2_runs import _env, tool

    work = tmp_path / "work"
    runs = {"baseline_lr0.001_bs8_adamw_ep100": [], "ofat_lr0.01_bs8_adamw_ep100": ["optimizer.lr=0.01"]}
    for name, extra in runs.items():
        run_cmd(tool(work / f"ofat_{name}", "train.epochs=2", *extra), env=_env(heads_data))
    single, ray = tmp_path / "single", tmp_path / "ray"
    run_cmd([sys.executable, "tools/summarize_ofat.py", "--work-dirs", str(work), "--out", str(single)])
    command = [sys.executable, "tools/ray_evaluate.py", "--ofat", "--work-dirs", str(work), "--out", str(ray)]
    run_cmd(command, env=_env(heads_data))
    for name in runs:
        for which in ("final", "best"):
            assert (work / f"ofat_{name}" / f"eval_{which}" / "eval_metrics.json").is_file(), (name, which)
    table = (ray / "ofat_summary.md").read_text()
    assert table == (single / "ofat_summary.md").read_text()
    assert table.count("| finished |") == 2
