"""Bad inputs and bad luck for mmseg / mmdet runs through tools/train.py and tools/test.py.

Damaged checkpoints, stop signals (iteration- and epoch-based loops), kills, a busy work dir, a
changed config on restart, a checkpoint of another model size, ``--out`` for both families and a
full disk: each case checks the exit status, that the message names the file / key / signal, and
that nothing was overwritten. The runs are the tiny SETR of tests/test_setr.py (4-layer ViT 64 wide
on 32x32 crops, 3.4 MB checkpoints) and the tiny YOLOX of tests/test_mmdet_train.py; one finished
SETR run is shared by the cases that damage a copy of it.
"""

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_mmdet_train import CONFIG as YOLOX, TINY as YOLOX_TINY
from test_setr import SMALL as SETR, cfg_options

from rat_plugins.engine.checkpoints import checkpoint_problem
from rat_plugins.engine.workdir_lock import LOCK_NAME, WorkDirLock

from _helpers import REPO, assert_same_weights, run_cmd

TRAIN, TEST = str(REPO / "tools/train.py"), str(REPO / "tools/test.py")
# no periodic checkpoint or validation in the way: a signal's checkpoint is the only one
LONG = dict(
    train_cfg__max_iters=10000,
    param_scheduler__0__end=10000,
    train_cfg__val_interval=10000,
    default_hooks__checkpoint__interval=1000,
)


def _env(data, **extra):
    # the pure-PyTorch scan: the C++ kernel's first load costs tens of seconds per process
    return {"RAT_DATASETS": str(data), "OMP_NUM_THREADS": "1", "RAT_PLUGINS_SCAN_BACKEND": "torch", **extra}


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes' size, modification time and content hash."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hash(p.read_bytes()))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class Background:
    """A tool run in the background, its stdout + stderr in a file the test can wait on."""

    def __init__(self, args, env, log: Path):
        self.log = log
        self.file = open(log, "w")
        full_env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"], **env}
        self.proc = subprocess.Popen(args, cwd=REPO, env=full_env, stdout=self.file, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"{pattern!r} never appeared (exit {self.proc.returncode}):\n{self.text()[-4000:]}")

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.file.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


def tool_main(path: str):
    """The ``main`` of tools/train.py or tools/test.py, run in this process (no interpreter start-up: the
    refusals that come before any model is built take milliseconds)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"rat_tool_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _iters_logged(text: str) -> list:
    return [int(n) for n in re.findall(r"Iter\(train\) \[\s*(\d+)/", text)]


@pytest.fixture(scope="module")
def finished_setr(tmp_path_factory, fundus_data):
    """A finished 4-iteration SETR run: iter_2.pth, iter_4.pth, best_Dice_iter_4.pth, run_config.json."""
    work = tmp_path_factory.mktemp("mm_runs") / "finished"
    run_cmd([sys.executable, TRAIN, str(SETR), "--work-dir", str(work), *cfg_options()], env=_env(fundus_data))
    assert (work / "iter_4.pth").is_file() and (work / "run_config.json").is_file()
    return work


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- resuming


@pytest.mark.slow
def test_truncated_last_checkpoint_resumes_from_the_older_one(finished_setr, fundus_data, tmp_path):
    work = _copy(finished_setr, tmp_path / "work")
    last = work / "iter_4.pth"
    last.write_bytes(last.read_bytes()[:1000])  # what a kill in mmengine's plain write leaves
    older = (work / "iter_2.pth").read_bytes()
    proc = run_cmd(
        [sys.executable, TRAIN, str(SETR), "--work-dir", str(work), "--resume", *cfg_options()], env=_env(fundus_data)
    )
    out = proc.stdout + proc.stderr
    assert re.search(r"cannot resume from \S*iter_4\.pth: it is truncated", out), out[-3000:]
    assert "resuming from the newest intact checkpoint instead" in out and "iter_2.pth" in out
    assert "resumed epoch: 0, iter: 2" in out and _iters_logged(out) == [3, 4]
    assert (work / "iter_2.pth").read_bytes() == older  # the checkpoint resumed from is not rewritten
    assert checkpoint_problem(last) is None
    assert torch.load(last, map_location="cpu", weights_only=False)["meta"]["iter"] == 4


def test_no_intact_checkpoint_starts_fresh_and_a_broken_explicit_one_is_refused(tmp_path):
    from mmengine.config import Config

    from rat_plugins.mm.runner import ConfigError, resolve_resume

    for name in ("iter_2.pth", "iter_4.pth"):
        (tmp_path / name).write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "last_checkpoint").write_text("")  # a save interrupted while writing the pointer
    cfg = Config(dict(work_dir=str(tmp_path), resume=True, load_from="pretrained.pth", default_hooks={}))
    warnings = resolve_resume(cfg, from_work_dir=True)
    assert "last_checkpoint is empty" in warnings[0]
    assert any("skipping" in w and "iter_4.pth" in w for w in warnings)
    assert any("skipping" in w and "iter_2.pth" in w for w in warnings)
    assert "no intact checkpoint" in warnings[-1] and "starts from the beginning" in warnings[-1]
    assert cfg.resume is False and cfg.load_from == "pretrained.pth"  # a fresh start still loads its weights

    explicit = Config(dict(work_dir=str(tmp_path), resume=True, load_from=str(tmp_path / "iter_4.pth")))
    with pytest.raises(ConfigError, match=r"load_from \S*iter_4\.pth \(resume=True\) cannot be resumed from"):
        resolve_resume(explicit, from_work_dir=False)


# ----------------------------------------------------------------------------- signals and kills


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_a_second_run_is_refused_and_sigint_after_resume(
    fundus_data, tmp_path, monkeypatch, capsys
):
    """SIGTERM mid-run: a checkpoint at the next iteration, exit 0; meanwhile a second run into the same work
    dir is refused naming the first's pid and host; --resume continues there, and SIGINT stops it the same way."""
    work, env = tmp_path / "work", _env(fundus_data)
    args = [sys.executable, TRAIN, str(SETR), "--work-dir", str(work), *cfg_options(**LONG)]
    first = Background(args, env, tmp_path / "first.log")
    first.wait_for(r"Iter\(train\) \[\s*3/")
    monkeypatch.setenv("RAT_DATASETS", str(fundus_data))
    assert tool_main(TRAIN)(args[2:]) == 2  # the second run, in this process: refused before it builds anything
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: work dir {work} is in use by tools/train.py" in err
    assert f"pid {first.proc.pid} on host {socket.gethostname()}" in err
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 0, first.text()[-3000:]
    stopped = int(re.search(r"SIGTERM: stopping after iteration (\d+); checkpoint (\S+)", first.text()).group(1))
    saved = work / f"iter_{stopped}.pth"
    assert checkpoint_problem(saved) is None and (work / "last_checkpoint").read_text() == str(saved)
    assert torch.load(saved, map_location="cpu", weights_only=False)["meta"]["iter"] == stopped
    assert max(_iters_logged(first.text())) == stopped and not (work / LOCK_NAME).exists()
    saved_bytes = saved.read_bytes()

    resumed = Background(args + ["--resume"], env, tmp_path / "resumed.log")
    resumed.wait_for(rf"Iter\(train\) \[\s*{stopped + 2}/")
    resumed.proc.send_signal(signal.SIGINT)
    assert resumed.finish() == 0, resumed.text()[-3000:]
    out = resumed.text()
    assert f"resumed epoch: 0, iter: {stopped}" in out and min(_iters_logged(out)) == stopped + 1
    later = int(re.search(r"SIGINT: stopping after iteration (\d+)", out).group(1))
    assert later > stopped and checkpoint_problem(work / f"iter_{later}.pth") is None
    assert saved.read_bytes() == saved_bytes  # the checkpoint resumed from is not rewritten
    assert "Traceback" not in out


@pytest.mark.slow
def test_sigterm_then_resume_ends_with_the_uninterrupted_runs_weights_and_metrics(fundus_data, tmp_path):
    """Stopped by SIGTERM and resumed, an iteration-based run ends where an uninterrupted one does: the same
    weights and the same validation metrics (same seed; the data replayed, each batch reseeded)."""
    env = _env(fundus_data)
    short = dict(LONG, train_cfg__max_iters=30, param_scheduler__0__end=30, train_cfg__val_interval=30)
    # randomness in the model too (dropout, drop path), beside the transforms' (this process: num_workers=0)
    short.update(model__decode_head__dropout_ratio=0.1, model__backbone__drop_path_rate=0.1)

    def args(work):
        return [sys.executable, TRAIN, str(SETR), "--work-dir", str(work), *cfg_options(**short)]

    work = tmp_path / "stopped"
    first = Background(args(work), env, tmp_path / "first.log")
    first.wait_for(r"Iter\(train\) \[\s*4/")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 0, first.text()[-3000:]
    stopped = int(re.search(r"SIGTERM: stopping after iteration (\d+)", first.text()).group(1))
    assert stopped < 29, "the run ended before the signal: nothing to compare"
    resumed = run_cmd(args(work) + ["--resume"], env=env)
    assert f"resumed epoch: 0, iter: {stopped}" in resumed.stdout + resumed.stderr
    whole = tmp_path / "uninterrupted"
    run_cmd(args(whole), env=env)
    assert_same_weights(work / "iter_30.pth", whole / "iter_30.pth", key="state_dict")
    final, expected = (json.loads((w / "final_metrics.json").read_text()) for w in (work, whole))
    for metrics in (final, expected):
        del metrics["val"]["time"], metrics["val"]["data_time"]  # how fast, not what was learnt
    assert final == expected and final["iter"] == 30 and final["val"]["mIoU"] > 0


@pytest.mark.slow
def test_sigkill_then_resume_loses_only_the_iterations_since_the_checkpoint(fundus_data, tmp_path):
    work, env = tmp_path / "work", _env(fundus_data)
    args = [sys.executable, TRAIN, str(SETR), "--work-dir", str(work)]
    options = cfg_options(**dict(LONG, default_hooks__checkpoint__interval=3))
    run = Background(args + options, env, tmp_path / "killed.log")
    run.wait_for(r"Iter\(train\) \[\s*5/")  # iter_3.pth is complete, the run is past it
    run.proc.send_signal(signal.SIGKILL)
    run.finish()
    last = int(re.search(r"iter_(\d+)\.pth", (work / "last_checkpoint").read_text()).group(1))
    assert (work / LOCK_NAME).exists()  # a killed run cannot release its lock: the next run takes it over
    resumed = Background(args + options + ["--resume"], env, tmp_path / "resumed.log")
    resumed.wait_for(rf"Iter\(train\) \[\s*{last + 1}/")
    resumed.proc.send_signal(signal.SIGTERM)
    assert resumed.finish() == 0, resumed.text()[-3000:]
    out = resumed.text()
    assert "taking over the stale lock" in out and f"process {run.proc.pid} on this host is gone" in out
    assert f"resumed epoch: 0, iter: {last}" in out and min(_iters_logged(out)) == last + 1
    stopped = int(re.search(r"SIGTERM: stopping after iteration (\d+)", out).group(1))
    ckpt = torch.load(work / f"iter_{stopped}.pth", map_location="cpu", weights_only=False)
    assert ckpt["meta"]["iter"] == stopped
    # the optimizer state came back with the weights: one AdamW state per trained parameter
    trained = [k for k in ckpt["state_dict"] if "running_" not in k and "num_batches" not in k]
    assert len(ckpt["optimizer"]["state"]) == len(trained)


def _descendants(pid: int) -> list:
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return children + [d for c in children for d in _descendants(c)]


def _worker_with_rank(script_pid: int, rank: int) -> int:
    """The pid of the training process with ``RANK=rank`` under tools/dist_train.sh (bash -> torchrun -> workers)."""
    found = _descendants(script_pid)
    for pid in found:
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except FileNotFoundError:
            continue
    raise AssertionError(f"no worker with RANK={rank} among {found}")


@pytest.mark.slow
def test_sigterm_to_one_rank_of_two_stops_both_with_one_checkpoint(fundus_data, tmp_path):
    """torchrun, 2 CPU processes over gloo: only rank 1 gets SIGTERM; the ranks agree at the next iteration,
    rank 0 saves, both exit 0 (a rank left alone would wait forever in the next all-reduce)."""
    from test_setr import _free_port

    work = tmp_path / "work"
    args = ["bash", str(REPO / "tools/dist_train.sh"), str(SETR), "2", "--work-dir", str(work), *cfg_options(**LONG)]
    run = Background(args, _env(fundus_data, PORT=str(_free_port()), PYTHON=sys.executable), tmp_path / "dist.log")
    run.wait_for(r"Iter\(train\) \[\s*3/")
    os.kill(_worker_with_rank(run.proc.pid, 1), signal.SIGTERM)
    assert run.finish(timeout=180) == 0, run.text()[-3000:]
    stopped = r"a stop signal \(on another rank\): stopping after iteration (\d+); checkpoint (\S+)"
    found = re.search(stopped, run.text())
    assert found, run.text()[-3000:]
    saved = Path(found.group(2))
    assert saved == work / f"iter_{found.group(1)}.pth" and checkpoint_problem(saved) is None
    assert (work / "last_checkpoint").read_text() == str(saved)


@pytest.mark.slow
def test_sigterm_to_dist_train_sh_reaches_the_workers_and_it_exits_0(fundus_data, tmp_path):
    """SIGTERM to tools/dist_train.sh (as a scheduler or `kill` sends it) is passed on to the training
    processes, not to torchrun's agent (which would exit 1 and stop them before they save)."""
    from test_setr import _free_port

    work = tmp_path / "work"
    args = ["bash", str(REPO / "tools/dist_train.sh"), str(SETR), "2", "--work-dir", str(work), *cfg_options(**LONG)]
    run = Background(args, _env(fundus_data, PORT=str(_free_port()), PYTHON=sys.executable), tmp_path / "dist.log")
    run.wait_for(r"Iter\(train\) \[\s*3/")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=180) == 0, run.text()[-3000:]
    assert "SignalException" not in run.text()
    saved = Path((work / "last_checkpoint").read_text())
    assert checkpoint_problem(saved) is None and re.fullmatch(r"iter_\d+\.pth", saved.name)


@pytest.mark.slow
def test_sigint_in_an_epoch_based_run_saves_and_resume_continues_to_the_uninterrupted_result(heads_data, tmp_path):
    """YOLOX (EpochBasedTrainLoop, 4 iterations an epoch): SIGINT ends the run with a checkpoint and exit 0,
    mid-epoch or at the epoch's end; --resume continues after the last trained iteration (mid-epoch: in
    that epoch) and ends with the uninterrupted run's weights."""
    env = _env(heads_data)
    options = ["--cfg-options", *YOLOX_TINY, "train_cfg.max_epochs=5", "train_dataloader.batch_size=2"]

    def args(work):
        return [sys.executable, TRAIN, str(YOLOX), "--work-dir", str(work), *options]

    work = tmp_path / "work"
    run = Background(args(work), env, tmp_path / "first.log")
    run.wait_for(r"Epoch\(train\)\s+\[2\]\[2/4\]")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 0, run.text()[-3000:]
    found = re.search(
        r"SIGINT: stopping (?:in epoch \d+ after iteration \d+|after epoch \d+); checkpoint (\S+)", run.text()
    )
    assert found, run.text()[-3000:]
    saved = Path(found.group(1))
    meta = torch.load(saved, map_location="cpu", weights_only=False)["meta"]
    assert checkpoint_problem(saved) is None and (work / "last_checkpoint").read_text() == str(saved)
    trained = len(re.findall(r"Epoch\(train\)\s+\[\d+\]\[\s*\d+/4\]", run.text()))
    assert meta["iter"] == trained < 20, "the run ended before the signal: nothing to compare"
    assert "Traceback" not in run.text()
    record = json.loads((work / "run_config.json").read_text())  # the runtime base's default seed, recorded
    assert record["reproducibility"]["seed"] == 0 and record["config"]["randomness.seed"] == 0

    resumed = run_cmd(args(work) + ["--resume"], env=env)
    text = resumed.stdout + resumed.stderr
    assert f"resumed epoch: {meta['epoch']}, iter: {meta['iter']}" in text
    next_epoch, next_batch = meta["iter"] // 4 + 1, meta["iter"] % 4 + 1  # the first iteration not trained
    logged = re.findall(r"Epoch\(train\)\s+\[(\d+)\]\[\s*(\d+)/4\]", text)
    assert logged[0] == (str(next_epoch), str(next_batch)) and len(logged) == 20 - meta["iter"], logged
    whole = tmp_path / "uninterrupted"
    run_cmd(args(whole), env=env)
    assert_same_weights(work / "epoch_5.pth", whole / "epoch_5.pth", key="state_dict")


# ----------------------------------------------------------------------------- the work dir


def test_busy_work_dir_is_refused_naming_pid_and_host(fundus_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAT_DATASETS", str(fundus_data))
    work = tmp_path / "work"
    work.mkdir()
    (work / "iter_2.pth").write_bytes(b"an earlier run's checkpoint")
    with WorkDirLock(work, what="tools/train.py another.py", heartbeat_s=0):
        before = snapshot(work)
        status = tool_main(TRAIN)([str(SETR), "--work-dir", str(work)])
        assert snapshot(work) == before
    err = capsys.readouterr().err
    # main returned (no exception escaped) and its last word is the one-line error
    assert status == 2 and err.strip().splitlines()[-1].startswith("error: "), err[-3000:]
    assert f"in use by tools/train.py another.py (pid {os.getpid()} on host {socket.gethostname()}" in err


def test_broken_evaluation_split_fails_before_training(fundus_data, tmp_path, monkeypatch, capsys):
    """The fundus configs evaluate on the validation split, first used after training: checked at start."""
    data = tmp_path / "data"
    shutil.copytree(fundus_data, data)
    mask = data / "fundus/drive_mmseg/annotations/validation/02_manual1.png"
    mask.write_bytes(b"not a png")
    monkeypatch.setenv("RAT_DATASETS", str(data))
    work = tmp_path / "work"
    status = tool_main(TRAIN)([str(SETR), "--work-dir", str(work), *cfg_options()])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and err.startswith("error: val_dataloader.dataset") and str(mask) in err, err
    assert not work.exists()  # refused before anything was written


@pytest.mark.slow
@pytest.mark.parametrize("resume", [True, False], ids=["resume", "fresh"])
def test_changed_config_in_a_finished_work_dir_is_refused(
    finished_setr, fundus_data, tmp_path, monkeypatch, capsys, resume
):
    monkeypatch.setenv("RAT_DATASETS", str(fundus_data))
    work = _copy(finished_setr, tmp_path / "work")
    before = snapshot(work)
    changed = cfg_options(optim_wrapper__optimizer__lr=0.001)
    status = tool_main(TRAIN)([str(SETR), "--work-dir", str(work), *changed] + (["--resume"] if resume else []))
    err = capsys.readouterr().err
    assert status == 2 and err.strip().splitlines()[-1].startswith("error: "), err[-3000:]
    assert f"{work} holds a training run started with another config" in err
    assert "optim_wrapper.optimizer.lr: 0.0001 -> 0.001" in err
    assert snapshot(work) == before
    record = json.loads((work / "run_config.json").read_text())
    assert record["reproducibility"]["seed"] == 0 and record["reproducibility"]["deterministic"] is False


# ----------------------------------------------------------------------------- tools/test.py


@pytest.mark.slow
def test_checkpoint_of_another_model_size_is_refused_and_a_fitting_one_scores(
    finished_setr, fundus_data, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("RAT_DATASETS", str(fundus_data))
    checkpoint, test = finished_setr / "iter_4.pth", tool_main(TEST)
    before = snapshot(finished_setr)
    args = [str(SETR), str(checkpoint), "--work-dir", str(tmp_path / "t")]
    wider = cfg_options(model__backbone__embed_dims=96, model__neck__in_channels=[96] * 4)
    assert test(args + wider) == 2  # in this process: the model is built, then refused
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: checkpoint {checkpoint} does not fit the model of {SETR}" in err
    assert "keys with another shape (backbone.cls_token: checkpoint 1x1x64, model 1x1x96" in err
    assert test(args + cfg_options(model__backbone__num_layers=5)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"\d+ missing keys \(backbone\.layers\.4\.", err), err
    # the same model: scored, and --out writes one mask per test image (mmseg: a folder)
    out = tmp_path / "masks"
    proc = run_cmd([sys.executable, TEST, *args, "--out", str(out), *cfg_options()], env=_env(fundus_data))
    assert "Dice:" in proc.stdout and sorted(p.name for p in out.iterdir()) == ["01.png", "02.png"]
    assert snapshot(finished_setr) == before


@pytest.mark.parametrize("family, out", [("mmseg", "masks.pkl"), ("mmdet", "predictions.json")])
def test_out_of_the_wrong_kind_is_refused(heads_data, fundus_data, tmp_path, monkeypatch, capsys, family, out):
    config, data = (SETR, fundus_data) if family == "mmseg" else (YOLOX, heads_data)
    monkeypatch.setenv("RAT_DATASETS", str(data))
    checkpoint = tmp_path / "model.pth"
    torch.save({"state_dict": {}}, checkpoint)
    status = tool_main(TEST)([str(config), str(checkpoint), "--out", str(tmp_path / out)])
    err = capsys.readouterr().err
    # main returned (no exception escaped) and its last word is the one-line error
    assert status == 2 and err.strip().splitlines()[-1].startswith("error: "), err[-3000:]
    assert f"--out {tmp_path / out}" in err
    assert ("a folder for the predicted masks" if family == "mmseg" else "give it a .pkl or .pickle name") in err
    assert not (tmp_path / out).exists()


@pytest.mark.slow
def test_mmdet_out_writes_the_predictions_pickle(heads_data, tmp_path):
    """mmdet's own tools/test.py adds a DumpDetResults metric; before, --out crashed (CocoMetric has no output_dir)."""
    import argparse

    from mmdet.registry import MODELS
    from mmengine.config import Config, DictAction
    from mmengine.registry import DefaultScope

    import rat_plugins.mm  # noqa: F401

    parser = argparse.ArgumentParser()
    parser.add_argument("--options", nargs="+", action=DictAction)
    cfg = Config.fromfile(str(YOLOX))
    cfg.merge_from_dict(parser.parse_args(["--options", *YOLOX_TINY]).options)  # as tools/test.py reads them
    with DefaultScope.overwrite_default_scope("mmdet"):
        model = MODELS.build(cfg.model)
    checkpoint, out = tmp_path / "yolox.pth", tmp_path / "predictions.pkl"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, checkpoint)
    args = [sys.executable, TEST, str(YOLOX), str(checkpoint), "--work-dir", str(tmp_path / "t"), "--out", str(out)]
    run_cmd(args + ["--cfg-options", *YOLOX_TINY], env=_env(heads_data))
    predictions = pickle.loads(out.read_bytes())
    assert len(predictions) > 0 and all("pred_instances" in p and "img_path" in p for p in predictions)


# ----------------------------------------------------------------------------- a full disk


def test_disk_full_in_a_checkpoint_save_keeps_the_previous_file(tmp_path, monkeypatch):
    """The checkpoint backend writes a temporary file: ENOSPC names the file and leaves the old one whole."""
    import errno

    from rat_plugins.mm.checkpoint import AtomicLocalBackend
    from rat_plugins.utils.atomic import DiskFullError

    path = tmp_path / "iter_4.pth"
    backend = AtomicLocalBackend()
    backend.put(b"the previous checkpoint", path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match=r"disk full while writing \S*iter_4\.pth"):
        backend.put(b"x" * 10_000, path)
    assert path.read_bytes() == b"the previous checkpoint" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_disk_full_in_the_successor_keeps_the_checkpoint_max_keep_ckpts_would_delete(tmp_path):
    """mmengine's CheckpointHook deletes the oldest checkpoint before writing the next; the safe hook after."""
    import errno
    from collections import deque
    from types import SimpleNamespace

    from rat_plugins.mm.checkpoint import AtomicLocalBackend
    from rat_plugins.mm.hooks import SafeCheckpointHook, _DeferredRemoval
    from rat_plugins.utils.atomic import DiskFullError

    oldest = tmp_path / "iter_1.pth"
    torch.save({"meta": {"iter": 1}}, oldest)

    def full_disk(out_dir, filename, *args, **kwargs):
        (Path(out_dir) / filename).write_bytes(b"a checkpoint cut short")
        raise DiskFullError(errno.ENOSPC, f"disk full while writing {Path(out_dir) / filename}")

    runner = SimpleNamespace(
        work_dir=str(tmp_path), save_checkpoint=full_disk, message_hub=SimpleNamespace(update_info=lambda *a: None)
    )
    hook = SafeCheckpointHook(interval=1, by_epoch=False, max_keep_ckpts=1)
    hook.out_dir, hook.keep_ckpt_ids = str(tmp_path), deque([1], 1)
    hook.file_backend = _DeferredRemoval(AtomicLocalBackend())
    with pytest.raises(DiskFullError, match=r"disk full while writing \S*iter_2\.pth"):
        hook._save_checkpoint_with_step(runner, 2, dict(iter=2))
    assert checkpoint_problem(oldest) is None  # still there: its successor never completed

    runner.save_checkpoint = lambda out_dir, filename, *a, **k: torch.save({}, Path(out_dir) / filename)
    hook._save_checkpoint_with_step(runner, 3, dict(iter=3))
    assert not oldest.exists() and checkpoint_problem(tmp_path / "iter_3.pth") is None


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: room for one tiny-SETR checkpoint (3.4 MB), not for a second beside it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.fail("cannot mount a tmpfs: needs root and mount (run the suite as root, as CI does)")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(small_disk, fundus_data):
    """max_keep_ckpts=1: mmengine deletes the old checkpoint before writing the new one, so a full disk in that
    write would leave none; the safe hook deletes it only after its successor is complete."""
    work = small_disk / "work"
    options = cfg_options(
        train_cfg__max_iters=6,
        param_scheduler__0__end=6,
        train_cfg__val_interval=6,
        default_hooks__checkpoint__interval=1,
        default_hooks__checkpoint__max_keep_ckpts=1,
    )
    proc = run_cmd(
        [sys.executable, TRAIN, str(SETR), "--work-dir", str(work), *options], env=_env(fundus_data), check=False
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: disk full while writing {work / 'iter_2.pth'}" in proc.stderr, proc.stderr[-3000:]
    assert checkpoint_problem(work / "iter_1.pth") is None
    assert (work / "last_checkpoint").read_text() == str(work / "iter_1.pth")
    assert not [p for p in work.iterdir() if ".tmp" in p.name]
