"""Sweeps as scheduler job arrays: one array task per run, a concurrency cap, finished runs skipped,
and a dependent job that builds the summary when the last run ends.

    python -m rat_plugins.cluster.sweep submit MANIFEST [tools/submit.py options]
    python -m rat_plugins.cluster.sweep status MANIFEST
    python -m rat_plugins.cluster.sweep task MANIFEST        # inside an array task (the job script runs it)

A manifest (JSON, written by the sweep's own script, e.g. ``run_all_ofat.sh --submit``) lists the
runs — ``{"name", "config", "work_dir", "overrides"}`` run through the project's tools, or
``{"name", "command", "work_dir"}`` for a study's own one-process command — and the summary command.
A run is finished when its work dir holds ``done_file`` (default ``final_metrics.json``). ``submit`` writes
the array script beside it and records the job ids in it; ``status`` reads them back.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.config_keys import ConfigError
from . import submit as submit_mod

__all__ = ["write_manifest", "read_manifest", "submit_sweep", "sweep_status", "run_task", "main", "FINISHED_MARKER"]

FINISHED_MARKER = "final_metrics.json"  # what both tool families' runs write last


def write_manifest(path, name: str, runs: List[Dict], summary: Optional[List[str]] = None) -> Path:
    """Write a sweep manifest: ``runs`` of dicts with name, config, work_dir and overrides."""
    for run in runs:
        missing = [k for k in ("name", "work_dir") if not run.get(k)]
        if not run.get("config") and not run.get("command"):
            missing.append("config or command")
        if missing:
            raise ConfigError(f"sweep {name}: run {run} lacks {missing}")
        run.setdefault("overrides", [])
        run.setdefault("done_file", FINISHED_MARKER)
    path = Path(path)
    atomic_write_json(path, dict(name=name, runs=runs, summary=summary or [], jobs={}), indent=1)
    return path


def read_manifest(path) -> Dict:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep manifest not found: {path}") from None
    except ValueError as e:
        raise ConfigError(f"sweep manifest {path} is not valid JSON ({e})") from None
    if not isinstance(manifest.get("runs"), list) or not manifest["runs"]:
        raise ConfigError(f"sweep manifest {path} lists no runs")
    return manifest


def _run_spec(template: submit_mod.JobSpec, run: Dict) -> submit_mod.JobSpec:
    import dataclasses

    return dataclasses.replace(
        template, config=run["config"], work_dir=run["work_dir"], overrides=list(run["overrides"]), job_name=run["name"]
    )


def submit_sweep(manifest_path, template: submit_mod.JobSpec, scheduler: str, max_parallel: int = 0, dry_run=False):
    """Submit the array (and the dependent summary job); return {"array": id, "summary": id or None}."""
    manifest_path = Path(manifest_path).resolve()
    manifest = read_manifest(manifest_path)
    runs = manifest["runs"]
    for run in runs:  # every run's config must be readable before anything is queued
        if run.get("config"):
            submit_mod.config_tool_family(Path(template.repo, run["config"]))
    cap = f"%{max_parallel}" if max_parallel else ""
    task = " ".join(shlex.quote(w) for w in (template.python, "-m", "rat_plugins.cluster.sweep", "task"))
    command = f"{task} {shlex.quote(str(manifest_path))} --procs-per-node {template.processes_per_node}"
    folder = manifest_path.parent
    template.work_dir = str(folder)
    template.job_name = template.job_name or manifest.get("name", "sweep")
    if scheduler == "slurm":
        script_text = submit_mod.render_sbatch(template, command=command, array=f"0-{len(runs) - 1}{cap}")
    else:
        script_text = submit_mod.render_bsub(template, command=command, array=f"1-{len(runs)}{cap}")
    script = folder / f"{manifest_path.stem}.{'sbatch' if scheduler == 'slurm' else 'bsub'}"
    if dry_run:
        print(script_text, end="")
        return {}
    atomic_write_text(script, script_text)
    array_id = submit_mod.submit(script, scheduler)
    summary_id = None
    if manifest.get("summary"):
        summary = " ".join(shlex.quote(w) for w in manifest["summary"])
        if scheduler == "slurm":
            proc = subprocess.run(
                [
                    "sbatch",
                    "--parsable",
                    f"--dependency=afterany:{array_id}",
                    f"--job-name={template.job_name}-summary",
                    f"--output={folder}/summary-%j.out",
                    f"--chdir={template.repo}",
                    f"--wrap={summary}",
                ],
                capture_output=True,
                text=True,
            )
        else:
            proc = subprocess.run(
                [
                    "bsub",
                    "-w",
                    f"ended({array_id})",
                    "-J",
                    f"{template.job_name}-summary",
                    "-o",
                    f"{folder}/summary-%J.out",
                ]
                + ["-cwd", template.repo, summary],
                capture_output=True,
                text=True,
            )
        if proc.returncode != 0:
            raise ConfigError(f"the summary job was refused: {proc.stderr.strip()}")
        summary_id = (
            proc.stdout.strip().split(";")[0] if scheduler == "slurm" else proc.stdout.split("<")[1].split(">")[0]
        )
    manifest["jobs"] = dict(array=array_id, summary=summary_id, scheduler=scheduler, script=str(script))
    atomic_write_json(manifest_path, manifest, indent=1)
    return manifest["jobs"]


def _task_index(environ=None) -> int:
    env = os.environ if environ is None else environ
    if env.get("SLURM_ARRAY_TASK_ID"):
        return int(env["SLURM_ARRAY_TASK_ID"])
    if env.get("LSB_JOBINDEX"):
        return int(env["LSB_JOBINDEX"]) - 1  # LSF counts from 1
    raise ConfigError("not in an array task: neither $SLURM_ARRAY_TASK_ID nor $LSB_JOBINDEX is set")


def run_task(manifest_path, procs_per_node: int = 1) -> int:
    """Inside array task i: skip run i when it is finished, else become its per-node launcher."""
    manifest = read_manifest(manifest_path)
    index = _task_index()
    if not 0 <= index < len(manifest["runs"]):
        raise ConfigError(f"array task {index} but the manifest lists {len(manifest['runs'])} runs")
    run = manifest["runs"][index]
    done = Path(run["work_dir"]) / run.get("done_file", FINISHED_MARKER)
    if done.is_file():
        print(f"[sweep] {run['name']}: finished already ({done}); skipping")
        return 0
    Path(run["work_dir"]).mkdir(parents=True, exist_ok=True)
    if run.get("command"):
        print(f"[sweep] task {index}: {run['name']}: {' '.join(run['command'])}", flush=True)
        os.execvp(run["command"][0], run["command"])
    spec = _run_spec(submit_mod.JobSpec(config=run["config"], work_dir=run["work_dir"]), run)
    spec.procs_per_node = procs_per_node
    print(f"[sweep] task {index}: {run['name']} -> {run['work_dir']}", flush=True)
    from .launch import main as launch_main

    return launch_main(["--procs-per-node", str(spec.processes_per_node), *submit_mod._tool_command(spec)])


def _scheduler_states(jobs: Dict, count: int) -> Dict[int, str]:
    """{task index: scheduler state} of the array's tasks that the scheduler still knows."""
    states: Dict[int, str] = {}
    array = jobs.get("array")
    if not array:
        return states
    if jobs.get("scheduler") == "lsf":
        proc = subprocess.run(["bjobs", "-noheader", "-o", "jobindex stat", array], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit():
                states[int(parts[0]) - 1] = parts[1]
        return states
    for i in range(count):
        proc = subprocess.run(["scontrol", "show", "job", "-o", f"{array}_{i}"], capture_output=True, text=True)
        fields = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
        if fields.get("JobState"):
            states[i] = fields["JobState"]
    if not states:  # a pending array is one record until its tasks start
        proc = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%K %T"], capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            index, state = line.split()
            if index.isdigit():
                states[int(index)] = state
    return states


def sweep_status(manifest_path) -> List[Dict]:
    """One row per run: name, job id, state (finished / failed / running / pending / not submitted)."""
    manifest = read_manifest(manifest_path)
    jobs = manifest.get("jobs", {})
    states = _scheduler_states(jobs, len(manifest["runs"]))
    rows = []
    for i, run in enumerate(manifest["runs"]):
        scheduler_state = states.get(i)
        if (Path(run["work_dir"]) / run.get("done_file", FINISHED_MARKER)).is_file():
            state = "finished"
        elif scheduler_state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "EXIT"):
            state = "failed"
        elif scheduler_state in ("RUNNING", "COMPLETING", "RUN"):
            state = "running"
        elif scheduler_state in ("PENDING", "REQUEUED", "PEND", "CONFIGURING"):
            state = "pending"
        elif scheduler_state == "COMPLETED":
            state = "failed"  # ended without its final metrics
        else:
            state = "not submitted" if not jobs.get("array") else "unknown"
        job = f"{jobs['array']}_{i}" if jobs.get("scheduler") == "slurm" else f"{jobs.get('array')}[{i + 1}]"
        rows.append(
            dict(name=run["name"], job=job if jobs.get("array") else "-", state=state, work_dir=run["work_dir"])
        )
    return rows


def _print_status(rows) -> None:
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['job']:<12}  {r['state']:<13}  {r['work_dir']}")
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m rat_plugins.cluster.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["submit", "status", "task"])
    parser.add_argument("manifest")
    parser.add_argument("--max-parallel", type=int, default=0, help="array tasks running at once (0: no cap)")
    parser.add_argument("--procs-per-node", type=int, default=1, help=argparse.SUPPRESS)  # task: from submit
    known, rest = parser.parse_known_args(argv)
    try:
        if known.command == "status":
            _print_status(sweep_status(known.manifest))
            return 0
        if known.command == "task":
            return run_task(known.manifest, known.procs_per_node)
        manifest = read_manifest(known.manifest)
        # the scheduler options of tools/submit.py; each run brings its own config or command
        sub_args = submit_mod._parser().parse_intermixed_args([manifest.get("name", "sweep"), *rest])
        template, scheduler = submit_mod.build_spec(sub_args, check_config=False)
        jobs = submit_sweep(known.manifest, template, scheduler, known.max_parallel, dry_run=sub_args.dry_run)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jobs:
        print(f"submitted sweep {manifest.get('name')}: array job {jobs['array']} ({len(manifest['runs'])} runs)")
        if jobs.get("summary"):
            print(f"  summary job {jobs['summary']} runs when the array ends")
        print(f"  status: python -m rat_plugins.cluster.sweep status {known.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
