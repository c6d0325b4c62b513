"""The framework-neutral run machinery: checkpoint integrity and choice, signals, work-dir lock, run record."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from rat_plugins.engine.checkpoints import (
    atomic_torch_save,
    checkpoint_candidates,
    checkpoint_problem,
    choose_resume_checkpoint,
)
from rat_plugins.engine.run_record import (
    RunConfigChangedError,
    check_same_config,
    config_differences,
    flatten_config,
    record_run_config,
    reproducibility_settings,
)
from rat_plugins.engine.signals import GracefulStop
from rat_plugins.engine.workdir_lock import LOCK_NAME, WorkDirBusyError, WorkDirLock
from rat_plugins.utils.atomic import DiskFullError


def _save(path, value=1.0):
    atomic_torch_save({"model": {"w": torch.full((64,), value)}, "iteration": int(value)}, path)


def test_truncated_and_empty_checkpoints_are_named(tmp_path):
    good, cut, empty = tmp_path / "model_0000009.pth", tmp_path / "model_0000019.pth", tmp_path / "e.pth"
    _save(good)
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    empty.write_bytes(b"")
    assert checkpoint_problem(good) is None
    assert "truncated" in checkpoint_problem(cut)
    assert "empty" in checkpoint_problem(empty)
    assert "does not exist" in checkpoint_problem(tmp_path / "nope.pth")
    (tmp_path / "zip.pth").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip archive
    assert "not a PyTorch checkpoint" in checkpoint_problem(tmp_path / "zip.pth")


def test_resume_falls_back_to_newest_intact(tmp_path):
    for i in (4, 9, 14):
        _save(tmp_path / f"model_{i:07d}.pth", i)
    newest = tmp_path / "model_0000014.pth"
    newest.write_bytes(newest.read_bytes()[:100])
    chosen, warnings = choose_resume_checkpoint(newest, tmp_path, ["model_*.pth"])
    assert chosen == tmp_path / "model_0000009.pth"
    assert "model_0000014.pth" in warnings[0] and "truncated" in warnings[0]
    assert [p.name for p in checkpoint_candidates(tmp_path, ["model_*.pth"])][0] == "model_0000014.pth"
    # intact pointer wins without warnings
    assert choose_resume_checkpoint(tmp_path / "model_0000004.pth", tmp_path, ["model_*.pth"]) == (
        tmp_path / "model_0000004.pth",
        [],
    )
    for p in tmp_path.glob("model_*.pth"):
        p.write_bytes(b"")
    chosen, warnings = choose_resume_checkpoint(None, tmp_path, ["model_*.pth"])
    assert chosen is None and len(warnings) == 3


def test_atomic_torch_save_keeps_old_file_on_disk_full(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    _save(path, 1.0)
    before = path.read_bytes()

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match="disk full.*ckpt.pth"):
        _save(path, 2.0)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


def test_graceful_stop_records_signal_and_restores():
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == previous


def test_graceful_stop_extra_signal_from_env(monkeypatch):
    monkeypatch.setenv("RAT_STOP_SIGNALS", "USR1")
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert stop.requested == "SIGUSR1"
    monkeypatch.setenv("RAT_STOP_SIGNALS", "NOPE")
    with pytest.raises(ValueError, match="unknown signal 'NOPE'"):
        GracefulStop()


def test_workdir_lock_refuses_second_run_and_recovers_from_dead_owner(tmp_path):
    with WorkDirLock(tmp_path, what="first", heartbeat_s=0):
        with pytest.raises(WorkDirBusyError, match=rf"pid {os.getpid()} on host"):
            WorkDirLock(tmp_path, what="second", heartbeat_s=0).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    # a crashed run leaves its lock: its pid is gone, so the next run takes over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=int(dead.stdout), host=socket.gethostname())))
    with WorkDirLock(tmp_path, heartbeat_s=0) as lock:
        assert lock.held
    # another host's lock is trusted until it is stale
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=1, host="elsewhere")))
    with pytest.raises(WorkDirBusyError, match="host elsewhere"):
        WorkDirLock(tmp_path, heartbeat_s=0).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with WorkDirLock(tmp_path, heartbeat_s=0) as lock:
        assert lock.held


def test_run_record_refuses_changed_config(tmp_path):
    cfg = {"optimizer": {"lr": 0.1}, "train": {"max_iter": 10, "output_dir": "a"}, "steps": [1, 2]}
    flat = flatten_config(cfg)
    assert flat == {"optimizer.lr": 0.1, "train.max_iter": 10, "train.output_dir": "a", "steps": [1, 2]}
    check_same_config(tmp_path, flat)  # nothing recorded yet
    record_run_config(tmp_path, flat, reproducibility_settings(seed=7, deterministic=False))
    check_same_config(tmp_path, flat)
    changed = flatten_config(dict(cfg, optimizer={"lr": 0.2}, train={"max_iter": 10, "output_dir": "b"}))
    assert config_differences(flat, changed, ignore=["train.output_dir"]) == ["optimizer.lr"]
    with pytest.raises(RunConfigChangedError, match=r"optimizer\.lr: 0\.1 -> 0\.2"):
        check_same_config(tmp_path, changed, ignore=["train.output_dir"])
    record = json.loads((tmp_path / "run_config.json").read_text())
    assert record["reproducibility"]["seed"] == 7


class _FillsUp:
    """A file that takes ``room`` bytes, then fails writes with ENOSPC (what a full disk does mid-checkpoint)."""

    def __init__(self, path, room=1000):
        self._file = open(path, "wb")
        self.room = room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self._file.write(data)

    def flush(self):
        self._file.flush()

    def fileno(self):
        return self._file.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def test_atomic_torch_save_names_disk_full_that_torch_reports_as_runtime_error(tmp_path, monkeypatch):
    """torch's zip writer turns the file's ENOSPC into "RuntimeError: unexpected pos ..."; it is still disk full."""
    from rat_plugins.engine import checkpoints

    path = tmp_path / "big.pth"
    _save(path, 1.0)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoints, "open", lambda p, mode="r", *a, **k: _FillsUp(p), raising=False)
    with pytest.raises(DiskFullError, match=r"disk full while writing the checkpoint .*big\.pth"):
        atomic_torch_save({"w": torch.zeros(400_000)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.pth"]  # the temporary file is gone


def test_atomic_torch_save_round_trips(tmp_path):
    path = tmp_path / "model_0000001.pth"
    _save(path, 3.0)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["iteration"] == 3 and torch.equal(loaded["model"]["w"], torch.full((64,), 3.0))


def test_graceful_stop_calls_back_once_and_forked_workers_ignore_signals():
    seen = []
    with GracefulStop(on_request=seen.append) as stop:
        pid = os.fork()
        if pid == 0:  # a data-loader worker: Ctrl-C reaches it too, and it must keep serving batches
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                os._exit(0 if stop.requested is None else 3)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert stop.requested is None and seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested == "SIGTERM" and seen == ["SIGTERM"]


def test_workdir_lock_of_the_same_scheduler_job_is_taken_over(tmp_path, monkeypatch):
    """A requeued job restarts (maybe on another node) while its old lock is still there."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=12345, host="node-a", job="slurm:4242")))
    with WorkDirLock(tmp_path, heartbeat_s=0) as lock:
        assert lock.held
        assert json.loads((tmp_path / LOCK_NAME).read_text())["job"] == "slurm:4242"
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=12345, host="node-a", job="slurm:9")))
    with pytest.raises(WorkDirBusyError, match="host node-a"):
        WorkDirLock(tmp_path, heartbeat_s=0).acquire()


class _RandomLoader:
    """An endless loader whose order (torch, at iterator start) and augmentation (numpy) are random."""

    def __iter__(self):
        while True:
            for index in torch.randperm(6).tolist():
                yield index + float(np.random.rand())


def _consume(batches, n):
    """What a training loop sees: each batch, then the model's own random draw (dropout, box sampling)."""
    out = []
    for batch in batches:
        out.append((batch, torch.rand(1).item(), random.random()))
        if len(out) == n:
            return out


def test_replayed_batches_continue_the_uninterrupted_stream():
    from rat_plugins.engine.reproducible import ReplayableBatches

    whole = _consume(ReplayableBatches(_RandomLoader(), seed=3, rank=1), 20)
    torch.manual_seed(12345)  # a restarted process: its generators anywhere
    resumed = ReplayableBatches(_RandomLoader(), seed=3, rank=1)
    resumed.skip = 7
    assert _consume(resumed, 13) == whole[7:]
    other_rank = _consume(ReplayableBatches(_RandomLoader(), seed=3, rank=0), 20)
    assert [b for b, _, _ in other_rank] != [b for b, _, _ in whole]
    # seed -1 (a new seed per run): the loader as it is, no reseeding
    torch.manual_seed(0)
    np.random.seed(0)
    plain = [next(iter(_RandomLoader())) for _ in range(1)]
    torch.manual_seed(0)
    np.random.seed(0)
    assert [next(iter(ReplayableBatches(_RandomLoader(), seed=-1, rank=0)))] == plain


def test_preserved_random_state_restores_every_generator():
    from rat_plugins.engine.reproducible import preserved_random_state

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    with preserved_random_state():  # work that draws from all three
        torch.rand(100), np.random.rand(100), [random.random() for _ in range(100)]
    after = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(after[0], expected[0]) and (after[1] == expected[1]).all() and after[2] == expected[2]
