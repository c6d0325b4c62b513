"""Ray Train as the engine (tools/ray_train.py): 2 CPU workers on a Ray of this machine, each running
tools/train.py as one rank; a killed worker's group is restarted by Ray and the run resumes from its
last checkpoint, ending with the weights of an uninterrupted plain 2-process run."""

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from _helpers import REPO, assert_same_weights, run_cmd, tiny_ofat_command

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


@pytest.mark.slow
def test_a_lazyconfig_trains_on_two_workers_as_on_two_plain_processes(heads_data, tmp_path):
    """Each worker runs tools/lazyconfig_train_net.py as one machine of two (detectron2's own launch)."""
    env = {"RAT_DATASETS": str(heads_data), "OMP_NUM_THREADS": "1"}
    run_cmd(tiny_ofat_command(tmp_path / "plain", "--num-gpus", "2"), env=env)
    ray = tiny_ofat_command(tmp_path / "ray")
    ray[1:4] = ["tools/ray_train.py", ray[3], "--num-workers", "2"]  # CONFIG in place of --config-file CONFIG
    proc = run_cmd(ray, env=env)
    assert "ray_train: finished" in proc.stdout
    assert_same_weights(tmp_path / "ray" / "model_final.pth", tmp_path / "plain" / "model_final.pth", key="model")
