"""Write and submit a SLURM (sbatch) or LSF (bsub) job for any project config.

``python tools/submit.py CONFIG [options] [key=value ...]``: the config's tool family is read from
the file (a detectron2 LazyConfig imports Python objects; an OpenMMLab config has ``_base_`` or
plain dicts), and the job runs the project's own tools through
:mod:`rat_plugins.cluster.launch`, once per node. The script asks for a warning signal before the
time limit, is requeueable and appends to one log, so a preempted or timed-out job checkpoints,
comes back and resumes (the tools always get ``--resume``; a first run has nothing to resume).

Site settings (partition, account, module loads, venv activation) come from
``~/.config/rat-plugins/cluster.toml`` (or ``--site FILE``)::

    partition = "gpu"                     # any option below, for every scheduler
    setup = ["module load cuda/12.1", "source ~/venvs/rat/bin/activate"]
    [slurm]
    account = "my-lab"
    extra = ["#SBATCH --exclusive"]
    [lsf]
    queue = "gpu"
"""

import argparse
import ast
import dataclasses
import datetime
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..utils.atomic import atomic_write_text
from ..utils.config_keys import ConfigError

__all__ = [
    "JobSpec",
    "config_tool_family",
    "render_sbatch",
    "render_bsub",
    "load_site_settings",
    "detect_scheduler",
    "submit",
    "main",
]

REPO = Path(__file__).resolve().parents[2]
SITE_FILE = Path("~/.config/rat-plugins/cluster.toml").expanduser()
SCHEDULERS = ("slurm", "lsf")


def config_tool_family(config: os.PathLike) -> str:
    """``"detectron2"`` for a LazyConfig, ``"openmmlab"`` for an mmseg / mmdet config."""
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"config not found: {path}")
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path} is not valid Python ({e.msg}, line {e.lineno})") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_base_" for t in node.targets):
            return "openmmlab"
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module.startswith("mmengine") or module.startswith("mmseg") or module.startswith("mmdet"):
                return "openmmlab"
            if node.level > 0 or module.startswith("detectron2") or module.startswith("rat_plugins.detectron2"):
                return "detectron2"
    if any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "dict" for n in ast.walk(tree)):
        return "openmmlab"
    raise ConfigError(
        f"cannot tell the tool family of {path}: neither a detectron2 LazyConfig (imports) nor an OpenMMLab "
        f"config (_base_ / dict(...))"
    )


@dataclasses.dataclass
class JobSpec:
    """One job: what runs and what it asks the scheduler for."""

    config: str
    work_dir: str
    overrides: List[str] = dataclasses.field(default_factory=list)
    tool_args: List[str] = dataclasses.field(default_factory=list)
    job_name: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: Optional[int] = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    time: Optional[str] = None  # SLURM format (D-HH:MM:SS, HH:MM:SS, minutes)
    partition: Optional[str] = None  # LSF: the queue
    account: Optional[str] = None  # LSF: the project (-P)
    qos: Optional[str] = None
    constraint: Optional[str] = None
    extra: List[str] = dataclasses.field(default_factory=list)
    setup: List[str] = dataclasses.field(default_factory=list)
    warning_signal: str = "USR2"
    warning_seconds: int = 90
    requeue: bool = True
    python: str = sys.executable
    repo: str = str(REPO)

    @property
    def family(self) -> str:
        return config_tool_family(self.config)

    @property
    def processes_per_node(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)

    @property
    def name(self) -> str:
        return self.job_name or Path(self.config).stem


def _tool_command(spec: JobSpec) -> List[str]:
    """The tool and its arguments (same on every node; the launcher adds the node's coordinates)."""
    if spec.family == "detectron2":
        return [
            "tools/lazyconfig_train_net.py",
            "--config-file",
            spec.config,
            "--resume",
            *spec.tool_args,
            f"train.output_dir={spec.work_dir}",
            *spec.overrides,
        ]
    options = ["--cfg-options", *spec.overrides] if spec.overrides else []
    return ["tools/train.py", spec.config, "--work-dir", spec.work_dir, "--resume", *spec.tool_args, *options]


def _launch_line(spec: JobSpec) -> str:
    words = [spec.python, "-m", "rat_plugins.cluster.launch", "--procs-per-node", str(spec.processes_per_node)]
    return " ".join(shlex.quote(w) for w in words + _tool_command(spec))


def render_sbatch(spec: JobSpec, command: Optional[str] = None, array: Optional[str] = None) -> str:
    """The sbatch script of ``spec``; ``command`` replaces the launcher line's program (sweeps), ``array``
    (``0-8%3``) makes it a job array with one log per task."""
    log = f"{spec.work_dir}/slurm-%A_%a.out" if array else f"{spec.work_dir}/slurm-%j.out"
    directives = [
        f"--job-name={spec.name}",
        f"--nodes={spec.nodes}",
        "--ntasks-per-node=1",  # the launcher starts the node's processes
        f"--output={log}",
        "--open-mode=append",  # a requeued job keeps one log
        f"--signal={spec.warning_signal}@{spec.warning_seconds}",  # to the job steps: the training processes
    ]
    if array:
        directives.append(f"--array={array}")
    if spec.requeue:
        directives.append("--requeue")
    if spec.gpus_per_node:
        directives.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        directives.append(f"--cpus-per-task={spec.cpus_per_task}")
    for flag, value in (
        ("mem", spec.mem),
        ("time", spec.time),
        ("partition", spec.partition),
        ("account", spec.account),
        ("qos", spec.qos),
        ("constraint", spec.constraint),
    ):
        if value:
            directives.append(f"--{flag}={value}")
    return _script(
        spec,
        array,
        "#SBATCH",
        directives,
        [
            'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST at $(date)"',
            f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {command or _launch_line(spec)}",
        ],
    )


def _script(spec: JobSpec, array: Optional[str], prefix: str, directives: List[str], run: List[str]) -> str:
    """A job script: the scheduler's directives, the site's extra lines and setup, then ``run``."""
    lines = ["#!/bin/bash", f"# {_what(spec, array)}, written by tools/submit.py"]
    lines += [f"{prefix} {d}" for d in directives]
    lines += [line if line.startswith(prefix) else f"{prefix} {line}" for line in spec.extra]
    lines += ["set -euo pipefail", *spec.setup, f"cd {shlex.quote(spec.repo)}"]
    lines.append(
        f"export RAT_STOP_SIGNALS={spec.warning_signal}  # the warning signal stops like SIGTERM: checkpoint, requeue"
    )
    return "\n".join(lines + run) + "\n"


def _what(spec: JobSpec, array: Optional[str]) -> str:
    return f"sweep {spec.name} (array {array})" if array else f"{spec.family} run of {spec.config}"


def _lsf_minutes(text: str) -> str:
    """SLURM-style time (``D-HH:MM:SS`` / ``HH:MM:SS`` / ``MM``) as LSF's ``-W [HH:]MM``."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    elif len(parts) == 2:
        minutes = parts[0] * 60 + parts[1]
    else:
        minutes = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
    minutes += int(days or 0) * 24 * 60
    return f"{minutes // 60}:{minutes % 60:02d}"


def render_bsub(spec: JobSpec, command: Optional[str] = None, array: Optional[str] = None) -> str:
    """The bsub script of ``spec`` (one task per host, started by blaunch); ``command`` and ``array``
    (``1-9%3``, LSF counts from 1) as in :func:`render_sbatch`."""
    directives = [
        f"-J {spec.name}[{array}]" if array else f"-J {spec.name}",
        f"-n {spec.nodes}",
        '-R "span[ptile=1]"',  # one launcher task per host
        f"-o {spec.work_dir}/lsf-%J_%I.out" if array else f"-o {spec.work_dir}/lsf-%J.out",
        f"-wa {spec.warning_signal}",
        f"-wt {max(1, round(spec.warning_seconds / 60))}",  # minutes before the limit
    ]
    if spec.requeue:
        directives.append("-r")
    if spec.gpus_per_node:
        directives.append(f'-gpu "num={spec.gpus_per_node}"')
    if spec.cpus_per_task:
        directives.append(f'-R "affinity[core({spec.cpus_per_task})]"')
    if spec.mem:
        directives.append(f'-R "rusage[mem={spec.mem}]"')
    if spec.time:
        directives.append(f"-W {_lsf_minutes(spec.time)}")
    if spec.partition:
        directives.append(f"-q {spec.partition}")
    if spec.account:
        directives.append(f"-P {spec.account}")
    if spec.constraint:
        directives.append(f'-R "select[{spec.constraint}]"')
    return _script(
        spec,
        array,
        "#BSUB",
        directives,
        [
            'HOSTS="$(sort -u "$LSB_DJOB_HOSTFILE" | tr "\\n" " ")"',
            'echo "job $LSB_JOBID on $HOSTS at $(date)"',
            f'blaunch -z "$HOSTS" env RAT_LAUNCHER=blaunch {command or _launch_line(spec)}',
        ],
    )


def load_site_settings(path: Optional[os.PathLike], scheduler: str) -> Dict:
    """Options of the site file for ``scheduler``: top-level keys, then its own table."""
    if path is None:
        path = SITE_FILE
        if not path.is_file():
            return {}
    path = Path(path)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"site file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"site file {path} is not valid TOML: {e}") from None
    settings = {k: v for k, v in data.items() if not isinstance(v, dict)}
    settings.update(data.get(scheduler, {}))
    if scheduler == "lsf" and "queue" in settings:
        settings["partition"] = settings.pop("queue")
    known = {f.name for f in dataclasses.fields(JobSpec)} - {"config", "work_dir", "overrides", "tool_args"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"site file {path}: unknown settings {unknown}; known: {sorted(known)}")
    return settings


def detect_scheduler() -> str:
    for name, command in (("slurm", "sbatch"), ("lsf", "bsub")):
        if shutil.which(command):
            return name
    raise ConfigError("no scheduler found: neither sbatch (SLURM) nor bsub (LSF) is on PATH; use --dry-run")


def submit(script: Path, scheduler: str) -> str:
    """Submit ``script``; return the job id."""
    if scheduler == "slurm":
        proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(f"sbatch refused {script}: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]
    with open(script) as f:
        proc = subprocess.run(["bsub"], stdin=f, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"bsub refused {script}: {proc.stderr.strip()}")
    # "Job <1234> is submitted to queue <normal>."
    return proc.stdout.split("<", 1)[1].split(">", 1)[0] if "<" in proc.stdout else proc.stdout.strip()


def _parser():
    p = argparse.ArgumentParser(prog="tools/submit.py", description="Submit a project config as a SLURM / LSF job.")
    p.add_argument("config", help="a detectron2 LazyConfig or an mmseg / mmdet config")
    p.add_argument("overrides", nargs="*", help="key=value overrides (detectron2) / --cfg-options entries (mm)")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="default: whichever of sbatch / bsub is on PATH")
    p.add_argument("--work-dir", help="the run's folder (default work_dirs/<config name>)")
    p.add_argument("--job-name")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--procs-per-node", type=int, help="training processes per node (default: GPUs, or 1)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem", help="memory per node, e.g. 64G")
    p.add_argument("--time", help="time limit, e.g. 1-00:00:00 or 04:00:00")
    p.add_argument("--partition", help="SLURM partition / LSF queue")
    p.add_argument("--account", help="SLURM account / LSF project")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--extra", action="append", default=[], help="an extra #SBATCH / #BSUB line (repeatable)")
    p.add_argument("--setup", action="append", default=[], help="a shell line run before training (repeatable)")
    p.add_argument("--site", help=f"site settings file (default {SITE_FILE}, when present)")
    p.add_argument("--signal", default="USR2@90", help="warning signal and seconds before the limit (SIG@SECONDS)")
    p.add_argument("--no-requeue", action="store_true", help="do not requeue on preemption / time limit")
    p.add_argument("--tool-arg", action="append", default=[], help="an extra argument of the training tool")
    p.add_argument("--dry-run", action="store_true", help="print the script and the submit command only")
    return p


def _positive(name: str, value: Optional[int], allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ConfigError(f"--{name} must be {'>= 0' if allow_zero else '>= 1'}, got {value}")


def build_spec(args, check_config: bool = True):
    """(JobSpec, scheduler) from the parsed options; ``check_config=False`` for sweeps, whose runs
    name their own configs or commands."""
    config = os.path.relpath(Path(args.config).resolve(), REPO) if Path(args.config).is_file() else args.config
    if check_config:
        config_tool_family(Path(REPO, config) if not os.path.isabs(config) else config)
    scheduler = args.scheduler or (detect_scheduler() if not args.dry_run else "slurm")
    settings = load_site_settings(args.site, scheduler)
    signal_name, _, seconds = args.signal.partition("@")
    if not signal_name or not seconds.isdigit():
        raise ConfigError(f"--signal {args.signal!r}: expected SIGNAL@SECONDS, e.g. USR2@90")
    for name in ("nodes", "procs_per_node", "cpus_per_task"):
        _positive(name.replace("_", "-"), getattr(args, name))
    _positive("gpus-per-node", args.gpus_per_node, allow_zero=True)
    work_dir = args.work_dir or os.path.join(
        os.environ.get("RAT_WORK_DIRS", str(REPO / "work_dirs")), Path(args.config).stem
    )
    spec = JobSpec(
        config=config,
        work_dir=str(Path(work_dir).resolve()),
        overrides=list(args.overrides),
        tool_args=list(args.tool_arg),
        warning_signal=signal_name.upper().removeprefix("SIG"),
        warning_seconds=int(seconds),
        requeue=not args.no_requeue,
    )
    for key, value in settings.items():
        setattr(spec, key, list(value) if isinstance(value, list) else value)
    for key in ("job_name", "procs_per_node", "cpus_per_task", "mem", "time", "partition", "account", "qos"):
        if getattr(args, key) is not None:
            setattr(spec, key, getattr(args, key))
    if args.constraint is not None:
        spec.constraint = args.constraint
    if args.nodes != 1 or "nodes" not in settings:
        spec.nodes = args.nodes
    if args.gpus_per_node or "gpus_per_node" not in settings:
        spec.gpus_per_node = args.gpus_per_node
    spec.extra = list(spec.extra) + args.extra
    spec.setup = list(spec.setup) + args.setup
    return spec, scheduler


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        spec, scheduler = build_spec(args)
        script_text = render_sbatch(spec) if scheduler == "slurm" else render_bsub(spec)
        suffix = "sbatch" if scheduler == "slurm" else "bsub"
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        script = Path(spec.work_dir) / f"job-{stamp}.{suffix}"
        command = f"sbatch --parsable {script}" if scheduler == "slurm" else f"bsub < {script}"
        if args.dry_run:
            print(script_text, end="")
            print(f"# submit with: {command}")
            return 0
        atomic_write_text(script, script_text)
        job_id = submit(script, scheduler)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log = Path(spec.work_dir) / (f"slurm-{job_id}.out" if scheduler == "slurm" else f"lsf-{job_id}.out")
    cancel = "scancel" if scheduler == "slurm" else "bkill"
    status = "squeue -j" if scheduler == "slurm" else "bjobs"
    print(f"submitted job {job_id} ({scheduler}): {spec.config}")
    print(f"  script: {script}")
    print(f"  log:    {log}")
    print(f"  follow: tail -f {log}   status: {status} {job_id}   cancel: {cancel} {job_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
