"""Jobs through a real SLURM on localhost (tools/local_slurm.sh, started by the ``slurm_cluster`` fixture)."""

import json
import os
import re
import subprocess
import sys

import pytest

from _helpers import REPO, assert_same_weights, run_cmd

pytestmark = pytest.mark.slurm


def _slurm(args, env, **kwargs):
    return subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, **kwargs)


def test_detection_inside_srun_and_batch_shell(slurm_cluster, tmp_path):
    """Each srun task sees its own rank in a 2-task world; the batch shell is one process."""
    probe = (
        "import json; from rat_plugins.cluster import detect_environment as d; "
        "e = d(); print(json.dumps(dict(launcher=e.launcher, rank=e.rank, world=e.world_size, "
        "local=e.local_rank, master=e.master_addr, port=e.master_port, job=e.job_id)))"
    )
    script = tmp_path / "job.sh"
    script.write_text(
        f"#!/bin/bash\n#SBATCH -n 2\n#SBATCH -o {tmp_path}/out.txt\ncd {REPO}\n"
        f"{sys.executable} -c '{probe}'\n"
        f"srun -n 2 {sys.executable} -c '{probe}'\n"
    )
    submitted = _slurm(["sbatch", "--parsable", "--wait", str(script)], slurm_cluster)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    rows = [json.loads(line) for line in (tmp_path / "out.txt").read_text().splitlines() if line.startswith("{")]
    batch, tasks = rows[0], sorted(rows[1:], key=lambda r: r["rank"])
    assert (batch["launcher"], batch["world"], batch["job"]) == ("slurm-batch", 1, job_id)
    assert [(t["launcher"], t["rank"], t["world"]) for t in tasks] == [("slurm", 0, 2), ("slurm", 1, 2)]
    assert {t["master"] for t in tasks} == {"localhost"} and tasks[0]["port"] == tasks[1]["port"] != 29500


def _job_state(job_id, env):
    out = _slurm(["scontrol", "show", "job", "-o", job_id], env).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    return fields.get("JobState"), fields


def wait_for_job(job_id, env, timeout=600, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        state, fields = _job_state(job_id, env)
        if state in states:
            return state, fields
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {state} after {timeout} s")


def submit_job(argv, env):
    proc = subprocess.run(
        [sys.executable, "tools/submit.py", *argv],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("submitted job ", 1)[1].split()[0]


@pytest.mark.slow
def test_submit_two_process_ofat_run(slurm_cluster, heads_data, tmp_path):
    from _helpers import TINY

    work = tmp_path / "ofat"
    env = {**slurm_cluster, "RAT_DATASETS": str(heads_data), "OMP_NUM_THREADS": "1"}
    job_id = submit_job(
        [
            "projects/ViTDet/configs/OFAT/baseline_lr0.001_bs8_adamw_ep100.py",
            "--scheduler",
            "slurm",
            "--procs-per-node",
            "2",
            "--work-dir",
            str(work),
            *TINY,
            "train.epochs=1",
            "dataloader.train.total_batch_size=4",
            "train.warmup_iters=1",
        ],
        env,
    )
    state, fields = wait_for_job(job_id, env)
    log = (work / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert json.loads((work / "final_metrics.json").read_text())["max_iter"] == 2
    assert "[launch] host" in log and "launcher slurm" in log


@pytest.mark.slow
def test_sweep_array_reports_finished_and_failed_runs(slurm_cluster, heads_data, tmp_path, monkeypatch):
    """Three OFAT runs as one job array (two at a time), one of them broken; the summary job runs last."""
    from rat_plugins.cluster.sweep import sweep_status, write_manifest

    from _helpers import TINY

    tiny = [*TINY, "train.epochs=1", "dataloader.train.total_batch_size=4", "train.warmup_iters=1"]
    names = ["baseline_lr0.001_bs8_adamw_ep100", "ofat_lr0.01_bs8_adamw_ep100", "ofat_lr0.001_bs8_sgd_ep100"]
    runs = [
        dict(
            name=name,
            config=f"projects/ViTDet/configs/OFAT/{name}.py",
            work_dir=str(tmp_path / f"ofat_{name}"),
            overrides=tiny + (["train.max_itr=3"] if i == 1 else []),  # a typo: this run fails at once
        )
        for i, name in enumerate(names)
    ]
    summary = [sys.executable, "tools/summarize_ofat.py", "--work-dirs", str(tmp_path)]
    manifest = write_manifest(tmp_path / "ofat_sweep.json", "ofat", runs, summary)
    env = {**slurm_cluster, "RAT_DATASETS": str(heads_data), "OMP_NUM_THREADS": "1"}
    proc = _slurm(
        [sys.executable, "-m", "rat_plugins.cluster.sweep", "submit", str(manifest), "--max-parallel", "2"],
        env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    jobs = json.loads(manifest.read_text())["jobs"]
    assert "#SBATCH --array=0-2%2" in (tmp_path / "ofat_sweep.sbatch").read_text()
    state, _ = wait_for_job(jobs["summary"], env, timeout=900)
    assert state == "COMPLETED", (tmp_path / f"summary-{jobs['summary']}.out").read_text()[-2000:]
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])  # sweep_status asks scontrol
    rows = {r["name"]: r["state"] for r in sweep_status(manifest)}
    assert rows == {names[0]: "finished", names[1]: "failed", names[2]: "finished"}, rows
    status = _slurm([sys.executable, "-m", "rat_plugins.cluster.sweep", "status", str(manifest)], env, cwd=REPO)
    assert "1 failed, 2 finished" in status.stdout
    assert "unknown config key 'train.max_itr'" in (tmp_path / f"slurm-{jobs['array']}_1.out").read_text()
    assert (tmp_path / "ofat_summary.md").is_file()
    # submitted again, finished runs are skipped by their array tasks
    proc = _slurm([sys.executable, "-m", "rat_plugins.cluster.sweep", "submit", str(manifest)], env, cwd=REPO)
    again = json.loads(manifest.read_text())["jobs"]
    wait_for_job(again["summary"], env, timeout=600)
    assert "finished already" in (tmp_path / f"slurm-{again['array']}_0.out").read_text()


@pytest.mark.slow
def test_rat_segmentation_group_as_job_array(slurm_cluster, tmp_path, monkeypatch):
    """The three RAT segmentation runs (quick mode) as array tasks; the table is built by the summary job."""
    from rat_plugins.cluster.sweep import sweep_status

    manifest, work = tmp_path / "rat.json", tmp_path / "rat"
    argv = ["segmentation", "--quick", "--iters", "3", "--work-dir", str(work), "--sweep-manifest", str(manifest)]
    env = {**slurm_cluster, "OMP_NUM_THREADS": "1"}
    assert _slurm([sys.executable, "tools/run_rat_experiments.py", *argv], env, cwd=REPO).returncode == 0
    proc = _slurm([sys.executable, "-m", "rat_plugins.cluster.sweep", "submit", str(manifest)], env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    jobs = json.loads(manifest.read_text())["jobs"]
    state, _ = wait_for_job(jobs["summary"], env, timeout=900)
    summary_log = (tmp_path / f"summary-{jobs['summary']}.out").read_text()
    assert state == "COMPLETED", summary_log[-3000:]
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    assert [r["state"] for r in sweep_status(manifest)] == ["finished"] * 3
    table = (work / "results.md").read_text()
    assert all(name in table for name in ("rat_isic_single_256", "rat_isic_dual_256-128", "rat_isic_triple_256-128-64"))


def _release_when_requeued(job_id, env, timeout=600):
    """Wait until the job is back in the queue after a requeue, then start it at once (SLURM holds a
    requeued job for about two minutes); return the wait in seconds from the call."""
    import time

    start = time.time()
    while time.time() - start < timeout:
        state, fields = _job_state(job_id, env)
        if int(fields.get("Restarts", "0")) >= 1 and state == "PENDING":
            # the node must be done with the job's previous run first, and the release must come in a
            # later second than the requeue: slurmd refuses a credential of the same second as the
            # revocation ("Job credential revoked")
            requeued_at = time.time()
            while _slurm(["sinfo", "-h", "-o", "%T"], env).stdout.strip() not in ("idle", "mixed"):
                time.sleep(0.5)
            time.sleep(max(0.0, requeued_at + 2 - time.time()))
            _slurm(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], env)
            return time.time() - start
        if state in ("COMPLETED", "FAILED", "CANCELLED"):
            raise AssertionError(f"job {job_id} ended {state} without a requeue")
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} was not requeued within {timeout} s")


def _wait_for_text(path, pattern, timeout=600):
    import re
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        text = path.read_text() if path.is_file() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not in {path} after {timeout} s:\n{text[-3000:]}")


@pytest.mark.slow
def test_ofat_job_preempted_by_the_warning_signal_requeues_and_resumes(slurm_cluster, heads_data, tmp_path):
    """USR2 (what --signal=USR2@90 sends before the time limit) to a 2-process detectron2 job: checkpoint,
    requeue, resume from that checkpoint, finish with the full iteration count."""
    from _helpers import TINY

    work = tmp_path / "ofat"
    env = {**slurm_cluster, "RAT_DATASETS": str(heads_data), "OMP_NUM_THREADS": "1"}
    tiny = [*TINY, "train.epochs=10", "dataloader.train.total_batch_size=4", "train.warmup_iters=1"]
    job_id = submit_job(
        ["projects/ViTDet/configs/OFAT/baseline_lr0.001_bs8_adamw_ep100.py", "--scheduler", "slurm"]
        + ["--procs-per-node", "2", "--work-dir", str(work), *tiny, "train.eval_period=1000"],
        env,
    )
    _wait_for_text(work / "metrics.json", r'"iteration": 3\b')
    assert _slurm(["scancel", "--signal=USR2", job_id], env).returncode == 0
    waited = _release_when_requeued(job_id, env)
    state, fields = wait_for_job(job_id, env)
    log = (work / f"slurm-{job_id}.out").read_text()
    assert state == "COMPLETED" and fields["Restarts"] == "1", log[-4000:]
    stopped = re.search(r"Stopped by SIGUSR2 after iteration (\d+) of 20: checkpoint (\S+\.pth)", log)
    assert stopped, log[-4000:]
    assert f"requeued: scontrol requeue {job_id}" in log
    assert "(restart 1)" in log
    assert f"--resume: continuing from {stopped.group(2)}" in (work / "log.txt").read_text()
    records = [json.loads(line) for line in (work / "metrics.json").read_text().splitlines()]
    iterations = [r["iteration"] for r in records if "total_loss" in r]
    # every iteration trained exactly once over the two runs: nothing lost, nothing repeated
    assert iterations == list(range(20)), iterations
    final = json.loads((work / "final_metrics.json").read_text())
    assert final["max_iter"] == 20
    print(f"signal -> requeued and pending: {waited:.1f} s")
    # the same 2-process run, uninterrupted (detectron2's launch on this machine): the same result
    whole = tmp_path / "uninterrupted"
    args = [sys.executable, "tools/lazyconfig_train_net.py", "--num-gpus", "2", "--config-file"]
    args += ["projects/ViTDet/configs/OFAT/baseline_lr0.001_bs8_adamw_ep100.py", *tiny, "train.eval_period=1000"]
    run_cmd(args + [f"train.output_dir={whole}"], env=env)
    assert json.loads((whole / "final_metrics.json").read_text())["test"] == final["test"]
    assert_same_weights(work / "model_final.pth", whole / "model_final.pth", key="model")


@pytest.mark.slow
def test_setr_job_requeued_by_the_scheduler_resumes(slurm_cluster, fundus_data, tmp_path):
    """`scontrol requeue` (SLURM ends the job with SIGTERM and queues it again) of a 2-process mmseg job:
    the processes checkpoint on SIGTERM; the restart resumes and finishes with the full iteration count."""
    from test_setr import SMALL, _free_port, cfg_options

    work = tmp_path / "setr"
    env = {**slurm_cluster, "RAT_DATASETS": str(fundus_data), "OMP_NUM_THREADS": "1"}
    env["RAT_PLUGINS_SCAN_BACKEND"] = "torch"
    options = cfg_options(train_cfg__max_iters=40, param_scheduler__0__end=40, train_cfg__val_interval=40)[1:]
    job_id = submit_job(
        [str(SMALL), "--scheduler", "slurm", "--procs-per-node", "2", "--work-dir", str(work), *options], env
    )
    log = tmp_path / "setr" / f"slurm-{job_id}.out"
    _wait_for_text(log, r"Iter\(train\) \[\s*5/40\]")
    assert _slurm(["scontrol", "requeue", job_id], env).returncode == 0
    _release_when_requeued(job_id, env)
    state, fields = wait_for_job(job_id, env)
    text = log.read_text()
    assert state == "COMPLETED" and fields["Restarts"] == "1", text[-4000:]
    assert re.search(r"SIGTERM: stopping after iteration \d+; checkpoint \S+iter_\d+\.pth", text), text[-4000:]
    assert "Iter(train) [40/40]" in text
    final = json.loads((work / "final_metrics.json").read_text())
    assert final["iter"] == 40 and "Dice" in final["val"]
    # the same 2-process run, uninterrupted (torchrun on this machine): the same weights and metrics
    whole = tmp_path / "uninterrupted"
    dist = ["bash", "tools/dist_train.sh", str(SMALL), "2", "--work-dir", str(whole), "--cfg-options", *options]
    run_cmd(dist, env={**env, "PORT": str(_free_port()), "PYTHON": sys.executable})
    assert_same_weights(work / "iter_40.pth", whole / "iter_40.pth", key="state_dict")
    # and so the same test metrics (one process: the 2-rank validation inside training differed in the
    # second decimal between these runs although their weights are equal; see docs/reliability.md)
    scores = []
    for run in (work, whole):
        tested = run_cmd(
            [
                sys.executable,
                "tools/test.py",
                str(SMALL),
                str(run / "iter_40.pth"),
                "--work-dir",
                str(run / "test"),
                *cfg_options(),
            ],
            env=env,
        )
        scores.append(re.search(r"Iter\(test\) \[\d+/\d+\]\s+(aAcc:.*?)\s+data_time", tested.stdout + tested.stderr))
    assert scores[0] and scores[0].group(1) == scores[1].group(1), scores


@pytest.mark.slow
def test_tools_run_as_srun_tasks_without_cluster_flags(slurm_cluster, heads_data, fundus_data, tmp_path):
    """`srun -n 2 <tool>`: each task finds its rank, world and master from SLURM (no --launcher, no
    --num-machines); every rank logs its coordinates once."""
    import shlex

    from test_setr import SMALL, cfg_options

    from _helpers import TINY

    ofat, setr = tmp_path / "ofat", tmp_path / "setr"
    detectron2 = [sys.executable, "tools/lazyconfig_train_net.py", "--config-file"]
    detectron2 += ["projects/ViTDet/configs/OFAT/baseline_lr0.001_bs8_adamw_ep100.py", *TINY, "train.epochs=1"]
    detectron2 += ["dataloader.train.total_batch_size=4", "train.warmup_iters=1", f"train.output_dir={ofat}"]
    mm = [sys.executable, "tools/train.py", str(SMALL), "--work-dir", str(setr), *cfg_options(train_cfg__max_iters=2)]
    script = tmp_path / "job.sh"
    script.write_text(
        f"#!/bin/bash\n#SBATCH -n 2\n#SBATCH -o {tmp_path}/out.txt\nset -e\ncd {REPO}\n"
        f"srun -n 2 {shlex.join(detectron2)}\nRAT_DATASETS={fundus_data} srun -n 2 {shlex.join(mm)}\n"
    )
    env = {**slurm_cluster, "RAT_DATASETS": str(heads_data), "OMP_NUM_THREADS": "1"}
    env["RAT_PLUGINS_SCAN_BACKEND"] = "torch"
    proc = _slurm(["sbatch", "--parsable", "--wait", str(script)], env, cwd=REPO)
    out = (tmp_path / "out.txt").read_text()
    assert proc.returncode == 0, out[-4000:]
    for rank in (0, 1):  # once per tool
        assert len(re.findall(rf"rank {rank}/2, local rank \d, device cpu, launcher slurm, slurm job", out)) == 2, out
    assert json.loads((ofat / "final_metrics.json").read_text())["max_iter"] == 2
    assert json.loads((setr / "final_metrics.json").read_text())["iter"] == 2
