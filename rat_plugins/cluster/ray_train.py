"""Ray Train as the multi-node engine: ``python tools/ray_train.py CONFIG --num-workers N [...] [tool args]``.

Ray places the workers (``ray.train.torch.TorchTrainer``, one per training process, on any node of
the Ray cluster) and restarts the whole group when one dies (``FailureConfig(max_failures=K)``).
Each worker runs the project's own training tool as one rank of the run: ``tools/train.py`` with
torch's ``env://`` coordinates (OpenMMLab configs), or ``tools/lazyconfig_train_net.py`` as one
machine of ``--num-machines`` (detectron2 LazyConfigs). So the work dir, its lock, its checkpoints,
resume, signals and MLflow tracking are the project's, unchanged; Ray's process group only agrees on the
training group's address and port. Every start passes ``--resume``: a restarted group continues
from the last checkpoint in the work dir, not from zero. When the tool ends, each worker reports
the run's final metrics to Ray (``ray.train.report``).

A worker's training process dies with the worker (``PR_SET_PDEATHSIG``; detectron2's own child
process too, through ``$RAT_DIE_WITH_PARENT``): when Ray tears a group down after a failure, no
orphan keeps the work dir's lock or waits on a collective.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

from ..engine.signals import DIE_WITH_PARENT, die_with_parent
from ..utils.config_keys import ConfigError
from .environment import ProcessEnvironment, free_port

__all__ = ["parse_args", "tool_command", "main", "evaluate_main", "evaluate_ofat"]

REPO = Path(__file__).resolve().parents[2]
# the coordinates Ray gives its workers: the training processes get their own from their launcher
_COORDINATES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="tools/ray_train.py",
        description="Train a config with Ray Train workers (the project's training tool in each)",
        epilog="Arguments after the options go to the config's training tool (e.g. --work-dir DIR, "
        "--cfg-options k=v for OpenMMLab; train.output_dir=DIR overrides for detectron2).",
    )
    p.add_argument("config")
    p.add_argument("--num-workers", type=int, required=True, help="training processes (Ray workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument(
        "--address", default=None, help="a running Ray cluster (auto, or HOST:PORT); default: start one here"
    )
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before the run fails")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    args, tool_args = p.parse_known_args(argv)
    if args.num_workers < 1:
        p.error(f"--num-workers must be >= 1, got {args.num_workers}")
    if args.max_failures < 0:
        p.error(f"--max-failures must be >= 0, got {args.max_failures}")
    args.tool_args = tool_args
    return args


def tool_command(family: str, config: str, tool_args: List[str]) -> List[str]:
    """The tool and its arguments for one start of the run (always resuming from the work dir); a
    detectron2 worker's machine rank, machine count and address are filled in by the worker."""
    config = str(Path(config).resolve())
    if family == "openmmlab":
        return [sys.executable, "tools/train.py", config, *tool_args, "--launcher", "pytorch", "--resume"]
    # the flags before the overrides: detectron2's parser takes everything after the first key=value
    return [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", config, "--resume", *tool_args]


def _detectron2_machine(command: List[str], rank: int, world: int, address: str, port: int) -> List[str]:
    flags = ["--num-gpus", "1", "--num-machines", str(world), "--machine-rank", str(rank)]
    flags += ["--dist-url", f"tcp://{address}:{port}"]
    return command[:2] + flags + command[2:]


def _work_dir(family: str, config: str, tool_args: List[str]) -> Path:
    """Where the run writes: ``--work-dir`` / ``train.output_dir=``, else the tool's default."""
    for i, arg in enumerate(tool_args):
        if family == "openmmlab" and arg == "--work-dir" and i + 1 < len(tool_args):
            return Path(tool_args[i + 1]).resolve()
        if family == "openmmlab" and arg.startswith("--work-dir="):
            return Path(arg.split("=", 1)[1]).resolve()
        if family == "detectron2" and arg.startswith("train.output_dir="):
            return Path(arg.split("=", 1)[1]).resolve()
    if family == "openmmlab":
        return (REPO / "work_dirs" / Path(config).stem).resolve()
    from detectron2.config import LazyConfig

    return (REPO / LazyConfig.load(str(config)).train.output_dir).resolve()


def _worker(config: dict) -> None:
    """One Ray worker: this node's command of the project's tool, then the run's final metrics to Ray."""
    import ray.train
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # rank 0's address and a free port there, for the training processes' own group
    coordinates = [os.environ.get("MASTER_ADDR", "127.0.0.1"), free_port("")] if rank == 0 else [None, None]
    if dist.is_initialized():
        dist.broadcast_object_list(coordinates, src=0)
    address = "127.0.0.1" if config["local"] else coordinates[0]
    env = ProcessEnvironment(
        launcher="ray",
        rank=rank,
        world_size=world,
        local_rank=context.get_local_rank(),
        local_world_size=context.get_local_world_size(),
        master_addr=address,
        master_port=int(coordinates[1]),
    )
    child_env = {k: v for k, v in os.environ.items() if k not in _COORDINATES}
    child_env[DIE_WITH_PARENT] = "1"
    command = config["command"]
    if config["family"] == "openmmlab":
        child_env.update(env.torch_env())
    else:
        command = _detectron2_machine(command, rank, world, env.master_addr, env.master_port)
    print(f"ray worker {rank}/{world}: {' '.join(command)}", flush=True)
    status = subprocess.run(command, cwd=REPO, env=child_env, preexec_fn=die_with_parent).returncode
    if status != 0:
        raise RuntimeError(f"ray worker {rank}: {command[1]} exited with status {status}")
    final = Path(config["work_dir"]) / "final_metrics.json"
    metrics = {}
    if final.is_file():
        from ..tracking import flatten_metrics

        metrics = flatten_metrics(json.loads(final.read_text()))
    ray.train.report(metrics)


def main(argv=None) -> int:
    """``tools/ray_train.py``: 0 when the run finished, 1 when it failed after its restarts, 2 on bad input."""
    from .submit import config_tool_family

    args = parse_args(argv)
    try:
        family = config_tool_family(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not _ray_installed():
        return 2
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    work_dir = _work_dir(family, args.config, args.tool_args)
    command = tool_command(family, args.config, args.tool_args)
    _start_ray(args.address, args.num_workers * args.cpus_per_worker)
    resources = {"CPU": args.cpus_per_worker}
    trainer = TorchTrainer(
        _worker,
        train_loop_config=dict(command=command, family=family, work_dir=str(work_dir), local=not args.address),
        scaling_config=ScalingConfig(
            num_workers=args.num_workers, use_gpu=args.use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"{Path(args.config).stem}",
            storage_path=str(work_dir / "ray"),
            failure_config=FailureConfig(max_failures=args.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray's TrainingFailedError after the last restart: the workers' logs say why
        print(f"error: the run failed after {args.max_failures} restart(s): {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()
    print(f"ray_train: finished; final metrics in {work_dir / 'final_metrics.json'}")
    return 0


# ----------------------------------------------------------------------------- evaluation
def _evaluate_resolution(config: str, checkpoint: str, resolution: int, out: str, train_resolution: int, options):
    """One Ray task: the checkpoint at one resolution (the single-process tool's own evaluation)."""
    os.chdir(REPO)  # configs name files relative to the repository, as tools/ run them
    import rat_plugins.mm  # noqa: F401  (registers the plugin's components in this worker)
    from rat_plugins.experiments.robustness import evaluate_at_resolutions

    return evaluate_at_resolutions(
        config,
        checkpoint,
        [resolution],
        out,
        train_resolution,
        options.get("cfg_options"),
        options.get("max_memory_gb", 8.0),
        with_training_resolution=False,
    )


def _evaluate_ofat_checkpoint(run_dir: str, which: str) -> tuple:
    """One Ray task: an OFAT run's final or best model on the test split, through the training tool's
    ``--eval-only`` with the run's own config (its ``config.yaml``). Returns (run dir, which, test metrics)."""
    run = Path(run_dir)
    out = run / f"eval_{which}"
    command = [
        sys.executable,
        "tools/lazyconfig_train_net.py",
        "--eval-only",
        "--config-file",
        str(run / "config.yaml"),
    ]
    command += [f"train.init_checkpoint={run / f'model_{which}.pth'}", f"train.output_dir={out}"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return run_dir, which, json.loads((out / "eval_metrics.json").read_text()).get("test")


def evaluate_ofat(work_dirs: Path, out_dir: Path, quick: bool = False) -> str:
    """The OFAT sweep's test evaluations as Ray tasks (each finished run's final model, and its best-validation
    model when it has one); writes the summary table and plots of tools/summarize_ofat.py with those
    figures. Returns the table. Ray must be running."""
    import ray

    from ..experiments import ofat

    suffix = "_quick" if quick else ""
    names = ofat.config_names() + [ofat.BEST_COMBINATION]
    runs = {n: Path(work_dirs) / f"ofat_{n}{suffix}" for n in names}
    finished = {n: d for n, d in runs.items() if (d / "final_metrics.json").is_file() and (d / "config.yaml").is_file()}
    task = ray.remote(num_cpus=1)(_evaluate_ofat_checkpoint)
    futures = [
        task.remote(str(d), which)
        for d in finished.values()
        for which in ("final", "best")
        if (d / f"model_{which}.pth").is_file()
    ]
    results = {(Path(r), which): test for r, which, test in ray.get(futures)}
    rows = []
    for name, run_dir in runs.items():
        if name == ofat.BEST_COMBINATION and not run_dir.is_dir():
            continue
        row = ofat.summarize_run(name + (" (quick)" if quick else ""), run_dir)
        if name in finished:  # the evaluations' figures in place of those the training wrote
            test = ((results.get((run_dir, "final")) or {}).get("bbox")) or {}
            best = ofat.best_record(run_dir)
            if best is not None and (run_dir, "best") in results:
                best = dict(best, test=results[(run_dir, "best")])
            row = ofat.row_with_figures(row, test, best, ofat.iters_per_epoch(run_dir))
        rows.append(row)
    return ofat.write_summary(rows, Path(out_dir))


def evaluate_main(argv=None) -> int:
    """``tools/ray_evaluate.py CONFIG CHECKPOINT --robustness --resolutions ...``: each resolution a Ray
    task; the same table, plot and exit status as tools/evaluate_robustness.py. ``tools/ray_evaluate.py
    --ofat [--work-dirs DIR]``: the OFAT sweep's test evaluations, the table of tools/summarize_ofat.py."""
    if argv is None:
        argv = sys.argv[1:]
    if "--ofat" in argv:
        return _evaluate_ofat_main(argv)
    from mmengine.config import Config, DictAction

    from rat_plugins.experiments.robustness import METRICS, print_report, training_resolution

    p = argparse.ArgumentParser(prog="tools/ray_evaluate.py", description="Spread an evaluation over Ray workers")
    p.add_argument("config")
    p.add_argument("checkpoint")
    p.add_argument("--robustness", action="store_true", help="evaluate at each of --resolutions")
    p.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--train-resolution", type=int, help="default: the training pipeline's Resize scale")
    p.add_argument("--metric", default="Dice", choices=METRICS)
    p.add_argument("--out", help="output folder (default work_dirs/robustness/<config name>)")
    p.add_argument("--max-memory-gb", type=float, default=8.0)
    p.add_argument("--num-workers", type=int, default=2, help="evaluations at once")
    p.add_argument("--address", default=None, help="a running Ray cluster (auto, or HOST:PORT)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction)
    args = p.parse_args(argv)
    if not args.robustness:
        p.error(
            "give --robustness (CONFIG CHECKPOINT at each resolution) or --ofat (the OFAT sweep's test evaluations)"
        )
    config, checkpoint = Path(args.config).resolve(), Path(args.checkpoint).resolve()
    for label, path in (("config", config), ("checkpoint", checkpoint)):
        if not path.is_file():
            print(f"error: {label} not found: {path}", file=sys.stderr)
            return 2
    if not _ray_installed():
        return 2
    import ray

    base = Config.fromfile(str(config))
    if args.cfg_options:
        base.merge_from_dict(args.cfg_options)
    train_res = int(args.train_resolution or training_resolution(base))
    out = (Path(args.out) if args.out else REPO / "work_dirs" / "robustness" / config.stem).resolve()
    options = dict(cfg_options=args.cfg_options, max_memory_gb=args.max_memory_gb)
    _start_ray(args.address, args.num_workers)
    try:
        task = ray.remote(num_cpus=1)(_evaluate_resolution)
        futures = [
            task.remote(str(config), str(checkpoint), res, str(out), train_res, options)
            for res in sorted(set(args.resolutions) | {train_res})
        ]
        rows = [row for rows in ray.get(futures) for row in rows]
    finally:
        ray.shutdown()
    return print_report(rows, out, config.stem, args.metric)


def _evaluate_ofat_main(argv) -> int:
    p = argparse.ArgumentParser(prog="tools/ray_evaluate.py --ofat", description="The OFAT sweep's test evaluations")
    p.add_argument("--ofat", action="store_true", required=True)
    p.add_argument("--work-dirs", type=Path, default=Path(os.environ.get("RAT_WORK_DIRS", REPO / "work_dirs")))
    p.add_argument("--quick", action="store_true", help="the quick-mode runs (work_dirs/ofat_*_quick)")
    p.add_argument("--out", type=Path, help="where to write the table and plots (default: --work-dirs)")
    p.add_argument("--num-workers", type=int, default=2, help="evaluations at once")
    p.add_argument("--address", default=None, help="a running Ray cluster (auto, or HOST:PORT)")
    args = p.parse_args(argv)
    if not args.work_dirs.is_dir():
        print(f"error: no OFAT work dirs: {args.work_dirs} is not a folder", file=sys.stderr)
        return 2
    if not _ray_installed():
        return 2
    import ray

    _start_ray(args.address, args.num_workers)
    try:
        table = evaluate_ofat(args.work_dirs, args.out or args.work_dirs, args.quick)
    finally:
        ray.shutdown()
    print(table)
    return 0


def _start_ray(address, cpus: float) -> None:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address)
    else:  # a Ray of this machine only, on loopback, no dashboard
        ray.init(num_cpus=max(int(round(cpus)), 1), include_dashboard=False, _node_ip_address="127.0.0.1")


def _ray_installed() -> bool:
    try:
        import ray.train.torch  # noqa: F401
    except ImportError as e:
        print(f"error: Ray Train is not installed ({e}): pip install -e .[ray]", file=sys.stderr)
        return False
    return True
