"""Bad inputs and bad luck for detectron2 runs through tools/lazyconfig_train_net.py.

Damaged checkpoints, stop signals, kills, a busy or stale work dir, a checkpoint of another model
size, contradicting overrides, a changed config on restart and a full disk: each case checks the
exit status, that the message names the file / key / signal, and that nothing was overwritten.
The runs are a 2-layer ViM with 16-channel heads on 64x64 images (1.6 MB checkpoints, ~0.1 s an
iteration on 2 CPU cores); one finished run is shared by the cases that damage a copy of it.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _helpers import REPO, TINY, assert_same_weights, run_cmd

BASELINE = REPO / "projects/ViTDet/configs/OFAT/baseline_lr0.001_bs8_adamw_ep100.py"
# TINY with 16-channel pyramid and box heads: checkpoints of 1.6 MB instead of 590 MB
SMALL = [
    *TINY,
    "model.backbone.out_channels=16",
    "model.proposal_generator.head.in_channels=16",
    "dataloader.train.total_batch_size=2",  # 8 training images: 4 iterations an epoch
    "train.warmup_iters=1",
]
for _stage in range(3):
    SMALL += [
        f"model.roi_heads.box_heads.{_stage}.conv_dims=[16,16]",
        f"model.roi_heads.box_heads.{_stage}.input_shape.channels=16",
        f"model.roi_heads.box_heads.{_stage}.fc_dims=[32]",
        f"model.roi_heads.box_predictors.{_stage}.input_shape.channels=32",
    ]
FINISHED_EPOCHS = ["train.epochs=2"]  # 8 iterations: model_0000003.pth, model_0000007.pth, model_final.pth
LONG_EPOCHS = ["train.epochs=12", "train.eval_period=1000"]  # 48 iterations, no validation: time to send a signal


def tool(out, *overrides, flags=()):
    return [
        sys.executable,
        "tools/lazyconfig_train_net.py",
        *flags,
        "--config-file",
        str(BASELINE),
        *SMALL,
        f"train.output_dir={out}",
        *overrides,
    ]


def _env(heads_data):
    return {"RAT_DATASETS": str(heads_data)}


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _trained_iterations(out: Path) -> list:
    path = out / "metrics.json"
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return [m["iteration"] for m in lines if "total_loss" in m]


def _start(args, env, log: Path):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    handle = open(log, "w")
    proc = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=handle, stderr=subprocess.STDOUT)
    proc.log_file = handle
    return proc


def _wait_until(proc, condition, log: Path, timeout=180.0):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended ({proc.returncode}) before the test could act:\n{log.read_text()[-4000:]}"
            )
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting on the run:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def _finish(proc, timeout=180.0) -> int:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.log_file.close()
    return code


def _intact(path: Path) -> bool:
    from rat_plugins.engine.checkpoints import checkpoint_problem

    return checkpoint_problem(path) is None


def _newest_numbered(out: Path) -> Path:
    from rat_plugins.engine.checkpoints import checkpoint_candidates

    return [p for p in checkpoint_candidates(out, ["model_[0-9]*.pth"]) if _intact(p)][0]


@pytest.fixture(scope="module")
def finished_run(heads_data, tmp_path_factory):
    """One finished 8-iteration run; cases damage copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_cmd(tool(out, *FINISHED_EPOCHS), env=_env(heads_data))
    assert (out / "final_metrics.json").is_file() and (out / "model_0000007.pth").is_file()
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# -- damaged checkpoints ---------------------------------------------------------------------------
@pytest.mark.slow
def test_truncated_last_checkpoint_resumes_from_the_older_one(finished_run, heads_data, tmp_path):
    out = _copy(finished_run, tmp_path)
    # a run killed while its last checkpoint was written by a tool without atomic saves
    (out / "model_final.pth").unlink()
    (out / "final_metrics.json").unlink()
    (out / "last_checkpoint").write_text("model_0000007.pth")
    last = out / "model_0000007.pth"
    last.write_bytes(last.read_bytes()[:100_000])
    older = (out / "model_0000003.pth").read_bytes()
    proc = run_cmd(tool(out, *FINISHED_EPOCHS, flags=["--resume"]), env=_env(heads_data))
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0
    assert "cannot resume from" in log and "model_0000007.pth: it is truncated" in log
    assert "resuming from the newest intact checkpoint instead" in log and "model_0000003.pth" in log
    assert "Starting training from iteration 4" in log
    assert (out / "model_0000003.pth").read_bytes() == older  # the one resumed from is untouched
    assert _intact(last) and (out / "final_metrics.json").is_file()  # the damaged one was trained again


@pytest.mark.slow
def test_all_checkpoints_broken_starts_from_init_checkpoint_with_a_warning(finished_run, heads_data, tmp_path):
    out = _copy(finished_run, tmp_path)
    (out / "final_metrics.json").unlink()
    for path in out.glob("model_*.pth"):
        path.write_bytes(path.read_bytes()[:5000])
    proc = run_cmd(tool(out, *FINISHED_EPOCHS, flags=["--resume"]), env=_env(heads_data))
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0
    for name in ("model_final.pth", "model_0000007.pth", "model_0000003.pth"):
        assert f"{name}: it is truncated" in log, name
    assert "no intact checkpoint in" in log and "every one is damaged" in log
    assert "training starts at iteration 0 from the model's own initialisation" in log
    assert "Starting training from iteration 0" in log.split("no intact checkpoint")[-1]
    assert json.loads((out / "final_metrics.json").read_text())["max_iter"] == 8


# -- signals and kills -----------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_mid_run_checkpoints_exits_0_and_resume_continues(heads_data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "first.log"
    proc = _start(tool(out, *LONG_EPOCHS), _env(heads_data), log)
    _wait_until(proc, lambda: len(_trained_iterations(out)) >= 5, log)
    proc.send_signal(signal.SIGTERM)
    assert _finish(proc) == 0, log.read_text()[-3000:]
    run_log = (out / "log.txt").read_text()
    assert "received SIGTERM" in run_log
    stopped = [line for line in run_log.splitlines() if "Stopped by SIGTERM after iteration" in line]
    assert stopped, run_log[-3000:]
    iteration = int(stopped[0].split("after iteration ")[1].split()[0])
    checkpoint = out / f"model_{iteration:07d}.pth"
    assert str(checkpoint) in stopped[0] and _intact(checkpoint) and iteration < 47
    assert (out / "last_checkpoint").read_text() == checkpoint.name
    assert not (out / "final_metrics.json").exists() and not (out / ".run.lock").exists()
    # the same command with --resume continues after that iteration and finishes
    run_cmd(tool(out, *LONG_EPOCHS, flags=["--resume"]), env=_env(heads_data))
    resumed_log = (out / "log.txt").read_text()
    assert f"Starting training from iteration {iteration + 1}" in resumed_log
    assert f"replaying the data of the {iteration + 1} batches already trained" in resumed_log
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["max_iter"] == 48
    # ... and ends where an uninterrupted run ends: the same weights, the same test metrics
    whole = tmp_path / "uninterrupted"
    run_cmd(tool(whole, *LONG_EPOCHS), env=_env(heads_data))
    assert json.loads((whole / "final_metrics.json").read_text())["test"] == final["test"]
    assert_same_weights(out / "model_final.pth", whole / "model_final.pth", key="model")


@pytest.mark.slow
def test_sigint_to_a_two_process_run_stops_both_with_a_checkpoint(heads_data, tmp_path):
    """Ctrl-C (SIGINT) to the launcher of a 2-process (gloo) run: both processes stop after the same
    iteration, rank 0 checkpoints, exit 0; --resume continues (in one process: starting two costs
    half a minute more, and the number of processes is not part of the run's config)."""
    out, log = tmp_path / "ddp", tmp_path / "first.log"
    ddp = ["--num-gpus", "2"]
    args = tool(out, *LONG_EPOCHS, "dataloader.train.total_batch_size=4", flags=ddp)  # 2 iterations an epoch
    proc = _start(args, _env(heads_data), log)
    _wait_until(proc, lambda: len(_trained_iterations(out)) >= 4, log)
    proc.send_signal(signal.SIGINT)
    assert _finish(proc) == 0, log.read_text()[-3000:]
    run_log = (out / "log.txt").read_text()
    assert "SIGINT: asked the 2 training processes to save a checkpoint and stop" in run_log
    stopped = [line for line in run_log.splitlines() if "Stopped by SIGTERM after iteration" in line]
    assert stopped, run_log[-3000:]
    iteration = int(stopped[0].split("after iteration ")[1].split()[0])
    assert _intact(out / f"model_{iteration:07d}.pth") and iteration < 23
    rank1 = (out / "log.txt.rank1").read_text()
    assert "received SIGTERM" in rank1  # the other process stopped too, at the same iteration
    run_cmd(tool(out, *LONG_EPOCHS, "dataloader.train.total_batch_size=4", flags=["--resume"]), env=_env(heads_data))
    assert f"Starting training from iteration {iteration + 1}" in (out / "log.txt").read_text()
    assert json.loads((out / "final_metrics.json").read_text())["max_iter"] == 24


@pytest.mark.slow
def test_sigkill_then_resume_loses_only_the_iterations_since_the_last_checkpoint(heads_data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "first.log"
    proc = _start(tool(out, *LONG_EPOCHS), _env(heads_data), log)
    _wait_until(proc, lambda: (out / "model_0000007.pth").is_file() and len(_trained_iterations(out)) >= 10, log)
    proc.kill()  # SIGKILL: no handler runs, the lock stays behind
    assert _finish(proc) == -signal.SIGKILL
    assert (out / ".run.lock").is_file()
    newest = _newest_numbered(out)
    kept = int(newest.stem.split("_")[1])
    # what a kill during a save leaves: a temporary file, never a half-written model_*.pth
    (out / f".model_{kept + 4:07d}.pth.x1y2z3.tmp.pth").write_bytes(b"\0" * 1000)
    resumed = run_cmd(tool(out, *LONG_EPOCHS, flags=["--resume"]), env=_env(heads_data))
    run_log = (out / "log.txt").read_text()
    assert "taking over the stale lock" in resumed.stderr and "is gone" in resumed.stderr
    assert f"removed {out}/.model_{kept + 4:07d}.pth.x1y2z3.tmp.pth" in run_log
    assert f"continuing from {newest}" in run_log
    assert f"Starting training from iteration {kept + 1}" in run_log
    assert json.loads((out / "final_metrics.json").read_text())["max_iter"] == 48
    assert not list(out.glob(".*.tmp*")) and not (out / ".run.lock").exists()
    # max_to_keep (3) counts the killed session's checkpoints too: the newest three are left
    assert sorted(p.name for p in out.glob("model_[0-9]*.pth")) == [f"model_{i:07d}.pth" for i in (39, 43, 47)]


# -- the work dir ----------------------------------------------------------------------------------
def test_second_run_into_a_locked_work_dir_refuses_naming_pid_and_host(heads_data, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".run.lock").write_text(
            json.dumps(dict(pid=first.pid, host=socket.gethostname(), started="now", what="the first run"))
        )
        (out / "log.txt").write_text("the first run's log\n")
        before = _snapshot(out)
        proc = run_cmd(tool(out, *FINISHED_EPOCHS), env=_env(heads_data), check=False)
    finally:
        first.kill()
        first.wait()
    assert proc.returncode == 2
    assert f"pid {first.pid} on host {socket.gethostname()}" in proc.stderr and str(out) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(out) == before  # no log line, no config.yaml, the lock untouched


@pytest.mark.slow
def test_stale_lock_of_a_dead_process_is_taken_over(finished_run, heads_data, tmp_path):
    out = _copy(finished_run, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = dict(pid=int(dead.stdout), host=socket.gethostname(), started="earlier", what="a crashed run")
    (out / ".run.lock").write_text(json.dumps(lock))
    proc = run_cmd(tool(out, *FINISHED_EPOCHS, flags=["--resume"]), env=_env(heads_data))
    assert proc.returncode == 0
    assert f"taking over the stale lock {out / '.run.lock'}" in proc.stderr
    assert f"its process {lock['pid']} on this host is gone" in proc.stderr
    assert not (out / ".run.lock").exists()  # released at the end


# -- checkpoints that do not fit, overrides that contradict, a changed config ----------------------
@pytest.mark.slow
def test_eval_only_with_a_checkpoint_of_another_model_size_names_the_mismatches(finished_run, heads_data, tmp_path):
    out = tmp_path / "eval"
    checkpoint = finished_run / "model_final.pth"
    before = checkpoint.read_bytes()
    args = tool(out, f"train.init_checkpoint={checkpoint}", "model.backbone.net.embed_dim=48", flags=["--eval-only"])
    proc = run_cmd(args, env=_env(heads_data), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: the checkpoint {checkpoint} does not fit the model")
    assert "weights of another shape" in error and "in the checkpoint," in error and "backbone." in error
    assert "Traceback" not in proc.stderr and "Skip loading parameter" not in proc.stdout
    assert not (out / "eval_metrics.json").exists()  # no score of a partly random model
    assert checkpoint.read_bytes() == before


def test_eval_only_with_a_truncated_checkpoint_is_refused_before_starting(heads_data, tmp_path):
    checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    out = tmp_path / "eval"
    proc = run_cmd(
        tool(out, f"train.init_checkpoint={checkpoint}", flags=["--eval-only"]), env=_env(heads_data), check=False
    )
    assert proc.returncode == 2
    assert f"train.init_checkpoint {checkpoint} cannot be loaded: it is truncated" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_explicit_max_iter_that_contradicts_the_epochs_is_refused(heads_data, tmp_path):
    out = tmp_path / "run"
    proc = run_cmd(tool(out, "train.epochs=100", "train.max_iter=50"), env=_env(heads_data), check=False)
    assert proc.returncode == 2
    assert "train.max_iter=50 contradicts this config's epoch schedule" in proc.stderr
    assert "train.epochs=100" in proc.stderr and "Override train.epochs instead" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.slow
def test_finished_run_restarted_with_another_lr_is_refused_naming_the_key(finished_run, heads_data, tmp_path):
    out = _copy(finished_run, tmp_path)
    before = _snapshot(out)
    for flags in (["--resume"], []):
        proc = run_cmd(
            tool(out, *FINISHED_EPOCHS, "optimizer.lr=0.002", flags=flags), env=_env(heads_data), check=False
        )
        assert proc.returncode == 2, flags
        assert "holds a run started with another config (1 key differs: optimizer.lr: 0.001 -> 0.002)" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert _snapshot(out) == before  # checkpoints, metrics and log as the finished run left them


# -- a full disk -----------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode == 0


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(heads_data, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):  # room for one 1.6 MB checkpoint and the logs, not two
        pytest.fail("cannot mount a small tmpfs: needs root (run the suite as root, as CI does)")
    try:
        out = disk / "run"
        # 12 iterations: the second checkpoint (iteration 7) is the one that does not fit
        proc = run_cmd(tool(out, "train.epochs=3"), env=_env(heads_data), check=False)
        files = sorted(p.name for p in out.iterdir())
        previous_intact = _intact(out / "model_0000003.pth")
        pointer = (out / "last_checkpoint").read_text()
        run_log = (out / "log.txt").read_text()
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: disk full while writing") and f"{out}/model_0000007.pth" in error, error
    assert "Traceback" not in proc.stderr and "disk full while writing" in run_log
    assert previous_intact and pointer == "model_0000003.pth"
    assert "model_0000007.pth" not in files and not [f for f in files if f.endswith(".tmp.pth")]
    assert "final_metrics.json" not in files and ".run.lock" not in files


def test_injected_disk_full_keeps_the_previous_checkpoint_and_its_pointer(tmp_path, monkeypatch):
    """The checkpointer itself, without a training run: ENOSPC in the middle of a save."""
    import errno

    from detectron2.engine import hooks

    from rat_plugins.detectron2.checkpoint import RunCheckpointer
    from rat_plugins.detectron2.hooks import SafePeriodicCheckpointer, TrainingAborted

    model = torch.nn.Linear(4, 2)
    checkpointer = RunCheckpointer(model, str(tmp_path))
    periodic = SafePeriodicCheckpointer(checkpointer, period=1, max_to_keep=1)
    assert isinstance(periodic, hooks.PeriodicCheckpointer)
    periodic.step(0)
    first = (tmp_path / "model_0000000.pth").read_bytes()

    def fills_the_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fills_the_disk)

    class Trainer:
        iter = 1

    periodic.trainer = Trainer()
    with pytest.raises(TrainingAborted) as aborted:
        periodic.after_step()
    message = str(aborted.value.error)
    assert "disk full while writing" in message and str(tmp_path / "model_0000001.pth") in message
    # the previous checkpoint was not deleted for max_to_keep=1, and the pointer still names it
    assert (tmp_path / "model_0000000.pth").read_bytes() == first
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000000.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000000.pth"]
    monkeypatch.undo()
    periodic.after_step()  # space again: the new one is saved, then the old one deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]


def test_a_broken_test_split_fails_before_anything_starts(heads_data, tmp_path):
    """The data of every split is checked before launching: a missing test image is found in seconds,
    not after the whole training run."""
    data = tmp_path / "datasets"
    shutil.copytree(heads_data, data)
    missing = sorted((data / "coco" / "test").glob("*.jpg"))[0]
    missing.unlink()
    out = tmp_path / "run"
    proc = run_cmd(tool(out, *FINISHED_EPOCHS), env={"RAT_DATASETS": str(data)}, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert missing.name in proc.stderr and "test" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_disk_full_while_writing_the_final_metrics_keeps_the_old_file_and_names_it(tmp_path, monkeypatch, capsys):
    """final_metrics.json / eval_metrics.json go through atomic writes; the tool's guard prints one line, exit 1."""
    from rat_plugins.detectron2.engine import run_guarded
    from rat_plugins.utils import atomic
    from rat_plugins.utils.atomic import atomic_write_json

    if not os.path.exists("/dev/full"):
        pytest.fail("no /dev/full: this test needs Linux to fail writes with ENOSPC")
    metrics = tmp_path / "final_metrics.json"
    metrics.write_text('{"test": {"bbox": {"AP50": 12.5}}}\n')
    monkeypatch.setattr(atomic, "open", lambda path, mode="r", **kwargs: open("/dev/full", mode), raising=False)
    with pytest.raises(SystemExit) as exited:
        run_guarded(atomic_write_json, metrics, {"test": None})
    assert exited.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: disk full while writing {metrics}") and "previous file is unchanged" in error
    assert json.loads(metrics.read_text())["test"]["bbox"]["AP50"] == 12.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_metrics.json"]
