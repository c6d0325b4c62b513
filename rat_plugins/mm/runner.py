"""Shared logic of tools/train.py and tools/test.py for mmseg / mmdet configs (OpenMMLab CLI).

Besides parsing and building, the pieces that make a run lose nothing (all through mmengine's own
extension points: hooks, the checkpoint hook's file backend, ``load_from`` / ``resume``):
:func:`prepare_training` (atomic checkpoints, a checkpoint on SIGTERM / SIGINT), :func:`resolve_resume`
(resume from the newest intact checkpoint), :func:`check_run_config` / :func:`record_run_config`
(``run_config.json``: a changed config never silently continues an old run), :func:`launch_rank`
(the work-dir lock is rank 0's) and :func:`prepare_testing` (strict checkpoint loading, ``--out``).
"""

import argparse
import logging
import os
import os.path as osp
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..engine import run_record
from ..engine.checkpoints import checkpoint_problem
from ..engine.memory_cli import add_memory_arguments
from ..utils.config_keys import ConfigError, did_you_mean
from . import hooks  # noqa: F401  (registers SafeCheckpointHook, GracefulStopHook, CheckpointFitHook)
from .checkpoint import RESUME_PATTERNS, choose_mm_resume_checkpoint
from .loops import reproducible_loop_type

__all__ = [
    "train_parser",
    "test_parser",
    "check_options",
    "load_config",
    "build_runner",
    "unique_instance_names",
    "prepare_training",
    "resolve_resume",
    "comparable_config",
    "check_run_config",
    "record_run_config",
    "launch_rank",
    "prepare_testing",
    "ConfigError",
    "write_final_metrics",
    "add_tracking",
    "turn_on_activation_checkpointing",
    "end_tracking",
]


def _common(parser):
    parser.add_argument("config", help="config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models")
    parser.add_argument(
        "--cfg-options", nargs="+", action=DictAction, help="override settings, key=value (as OpenMMLab's tools)"
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser


def train_parser():
    p = _common(argparse.ArgumentParser(description="Train an mmseg / mmdet config"))
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the work dir's last checkpoint, or the newest intact one when that is damaged",
    )
    add_memory_arguments(p, amp_help="mixed precision (mmengine's AmpOptimWrapper; CUDA only)")
    engines = p.add_argument_group("DeepSpeed (mmengine's FlexibleRunner + DeepSpeedStrategy)")
    engines.add_argument("--deepspeed", choices=["zero2", "zero3"], help="train with DeepSpeed ZeRO stage 2 or 3")
    engines.add_argument("--offload-optimizer", choices=["cpu"], help="ZeRO: optimizer state in CPU memory")
    engines.add_argument("--offload-param", choices=["cpu"], help="ZeRO-3: parameters in CPU memory")
    return p


def test_parser():
    p = _common(argparse.ArgumentParser(description="Evaluate an mmseg / mmdet checkpoint"))
    p.add_argument("checkpoint", help="checkpoint file")
    p.add_argument("--out", help="dump predictions (mmseg: folder, mmdet: .pkl)")
    return p


def check_options(cfg, options) -> None:
    """Refuse --cfg-options keys whose parent exists but the leaf does not (likely a typo)."""
    for key in options or {}:
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, (list, tuple)) and part.isdigit():
                node = node[int(part)]
                continue
            if not hasattr(node, "keys") or part not in node:
                known = list(node.keys()) if hasattr(node, "keys") else []
                if i == len(parts) - 1 and "type" in known:
                    break  # adding a constructor argument to a registered type is legitimate
                raise ConfigError(
                    f"--cfg-options key {key!r}: {'.'.join(parts[: i + 1])!r} is not in the config."
                    f"{did_you_mean(part, known)}"
                )
            node = node[part]


def resolve_launcher(launcher: str) -> str:
    """The mmengine launcher for this process. A process started as one rank of a world — by torchrun,
    or by a scheduler (``srun -n N``, blaunch, jsrun, mpirun) — trains as that rank with ``--launcher
    none`` too (the scheduler's coordinates are exported for torch.distributed: ``pytorch``).
    ``slurm`` and ``mpi`` take the same path: mmengine's own SLURM launcher sets a CUDA device
    unconditionally (no CPU runs) and reads ``SLURM_NODELIST`` only."""
    from ..cluster.environment import adopt_environment, detect_environment

    if launcher not in ("none", "slurm", "mpi"):
        return launcher
    env = detect_environment()
    if env.distributed:
        adopt_environment()  # a no-op under torchrun, whose variables are there already
        return "pytorch"
    if launcher != "none":
        raise ConfigError(f"--launcher {launcher}: this process is not one rank of a {launcher} job ({env.launcher})")
    return launcher


def load_config(args) -> Config:
    if not osp.isfile(args.config):
        raise ConfigError(f"config file not found: {args.config}")
    cfg = Config.fromfile(args.config)
    cfg.launcher = resolve_launcher(args.launcher)
    check_options(cfg, args.cfg_options)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    if cfg.launcher != "none" and not torch.cuda.is_available():
        # CPU processes cannot use NCCL; gloo is the CPU backend of torch.distributed. DDP takes
        # no device ids for CPU modules.
        cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"
        if cfg.get("model_wrapper_cfg") is None:
            cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)
    _memory_switches(cfg, args)
    if getattr(args, "deepspeed", None) or cfg.get("deepspeed"):
        from .deepspeed import use_deepspeed  # precision goes into DeepSpeed's config, not AmpOptimWrapper

        use_deepspeed(cfg, args)
    elif getattr(args, "offload_optimizer", None) or getattr(args, "offload_param", None):
        raise ConfigError("--offload-optimizer / --offload-param need --deepspeed zero2|zero3")
    elif getattr(args, "amp", False) or getattr(args, "amp_dtype", None):
        if not torch.cuda.is_available():
            raise ConfigError(
                "--amp: mmengine's AmpOptimWrapper needs a CUDA device; on CPU train in full precision "
                "(the detectron2 tool has bfloat16 autocast on CPU: --amp-dtype bfloat16)"
            )
        if getattr(args, "amp_dtype", None):
            cfg.optim_wrapper.dtype = args.amp_dtype
        if cfg.optim_wrapper.type == "AmpOptimWrapper":
            print_log("AMP training is already enabled in your config.", logger="current", level=logging.WARNING)
        elif cfg.optim_wrapper.type != "OptimWrapper":
            raise ConfigError(f"--amp needs optim_wrapper.type OptimWrapper, got {cfg.optim_wrapper.type}")
        else:
            cfg.optim_wrapper.type = "AmpOptimWrapper"
            cfg.optim_wrapper.loss_scale = "dynamic"
    if getattr(args, "resume", False):
        cfg.resume = True
    return cfg


def _memory_switches(cfg: Config, args) -> None:
    if getattr(args, "clip_grad", None) is not None:
        if not args.clip_grad > 0:
            raise ConfigError(f"--clip-grad must be a positive number, got {args.clip_grad}")
        cfg.optim_wrapper.clip_grad = dict(max_norm=float(args.clip_grad), norm_type=2)


def turn_on_activation_checkpointing(runner: Runner) -> List[str]:
    """``--activation-checkpointing``: every backbone block of the built model that can be checkpointed."""
    from mmengine.model import is_model_wrapper

    from ..models.checkpointing import enable_activation_checkpointing

    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    switched = enable_activation_checkpointing(model)
    if not switched:
        raise ConfigError("--activation-checkpointing: this model has no blocks that can be checkpointed")
    print_log(f"Activation checkpointing: {', '.join(switched)}", logger="current")
    return switched


def unique_instance_names(cfg: Config) -> Config:
    """Give this run's visualizer a name no earlier Runner of the process used.

    mmengine keeps visualizers by name, process-wide, and the configs name theirs 'visualizer':
    a second Runner in the same process (a sweep, a test after a train) would get the first run's
    visualizer back and write its scalars into the first run's work dir.
    """
    from mmengine.visualization import Visualizer

    def subclasses(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from subclasses(sub)

    vis = cfg.get("visualizer")
    # every class keeps its own instances (SegLocalVisualizer, DetLocalVisualizer, ...)
    if isinstance(vis, dict) and any(
        c.check_instance_created(vis.get("name", "visualizer")) for c in subclasses(Visualizer)
    ):
        vis["name"] = f"{vis.get('name', 'visualizer')}_{time.time_ns()}"
    return cfg


def build_runner(cfg: Config) -> Runner:
    unique_instance_names(cfg)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = "0"
    if cfg.get("launcher", "none") != "none" and not torch.cuda.is_available():
        import torch.distributed as dist

        # mmengine's init_dist calls torch.cuda.set_device unconditionally; starting the gloo
        # group first makes the Runner skip it (it only initialises when none exists).
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    if isinstance(runner.model, dict):
        # a FlexibleRunner (DeepSpeed) builds its model only in train(), after the data loaders: built
        # here, as a Runner builds it, its initial weights are those of the same config under a Runner
        runner.model = runner.strategy.build_model(runner.model)
    from mmengine.dist import get_dist_info

    from ..cluster.environment import coordinates_line

    rank, world = get_dist_info()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    line = coordinates_line(rank, int(os.environ.get("LOCAL_RANK", 0)), world, device)
    print(line, file=sys.stderr, flush=True)  # every rank, once (mmengine's logger writes rank 0 only)
    return runner


# ----------------------------------------------------------------------------- training that loses nothing


def prepare_training(cfg: Config) -> Config:
    """Swap mmengine's ``CheckpointHook`` for :class:`~rat_plugins.mm.hooks.SafeCheckpointHook` (same
    arguments) and add :class:`~rat_plugins.mm.hooks.GracefulStopHook`, so every config gets both; run
    mmengine's training loops as their reproducible subclasses (:mod:`rat_plugins.mm.loops`: a resumed run
    continues as the uninterrupted one would)."""
    if isinstance(cfg.get("train_cfg"), dict):
        cfg.train_cfg = reproducible_loop_type(cfg.train_cfg)
    add_tracking(cfg)
    checkpoint = (cfg.get("default_hooks") or {}).get("checkpoint")
    if isinstance(checkpoint, dict) and checkpoint.get("type") in ("CheckpointHook", "mmengine.CheckpointHook"):
        checkpoint["type"] = "SafeCheckpointHook"
    custom = list(cfg.get("custom_hooks") or [])
    if not any(isinstance(h, dict) and h.get("type") == "GracefulStopHook" for h in custom):
        custom.append(dict(type="GracefulStopHook"))
    early = early_stopping_hook(cfg)
    if early is not None:
        custom.append(early)
    cfg.custom_hooks = custom
    fraction = cfg.get("dataset_fraction")
    if fraction and cfg.get("train_dataloader"):
        cfg.train_dataloader.dataset = dict(
            type="DatasetFraction", dataset=cfg.train_dataloader.dataset, fraction=fraction
        )
    return cfg


# the validation metric to watch, by evaluator (mmengine logs it under this name)
_MONITORS = {"IoUMetric": "mDice", "VesselMetric": "Dice", "LesionMetric": "Dice", "CocoMetric": "coco/bbox_mAP_50"}


def early_stopping_hook(cfg: Config) -> Optional[dict]:
    """mmengine's ``EarlyStoppingHook`` from ``early_stopping = dict(patience=N, monitor=None, min_delta=0.0)``
    (off without a patience). The monitor defaults to the validation metric: mDice (mmseg), Dice (the
    vessel and lesion metrics), coco/bbox_mAP_50 (mmdet). Its patience count starts again when a run resumes
    (mmengine keeps no state for it in checkpoints)."""
    section = cfg.get("early_stopping") or {}
    patience = section.get("patience")
    if not patience:
        return None
    if not (isinstance(patience, int) and patience >= 1):
        raise ConfigError(f"early_stopping.patience must be a whole number >= 1, got {patience!r}")
    monitor = section.get("monitor")
    if not monitor:
        evaluator = cfg.get("val_evaluator") or {}
        evaluator = evaluator[0] if isinstance(evaluator, (list, tuple)) and evaluator else evaluator
        monitor = _MONITORS.get(str(evaluator.get("type", "")).split(".")[-1]) if isinstance(evaluator, dict) else None
        if monitor is None:
            raise ConfigError(
                "early_stopping: name the validation metric to watch with early_stopping.monitor=... "
                f"(its name in the validation log; the evaluator is {evaluator.get('type') if evaluator else None})"
            )
    hook = dict(type="EarlyStoppingHook", monitor=monitor, patience=patience, rule="greater")
    hook["min_delta"] = float(section.get("min_delta", 0.0))
    return hook


def add_tracking(cfg: Config, **backend) -> Config:
    """Add :class:`~rat_plugins.mm.tracking.ProjectMLflowVisBackend` (with ``backend``'s arguments: run name,
    tracking URI) to the visualizer (unless ``$RAT_TRACKING=0`` or the config lists an MLflow backend of its own)."""
    from ..tracking import tracking_enabled

    visualizer = cfg.get("visualizer")
    if not tracking_enabled() or not isinstance(visualizer, dict):
        return cfg
    backends = list(visualizer.get("vis_backends") or [])
    if not any("MLflow" in str(b.get("type", "")) for b in backends if isinstance(b, dict)):
        backends.append(dict(type="ProjectMLflowVisBackend", **backend))
    visualizer["vis_backends"] = backends
    return cfg


def end_tracking(cfg: Config, stopped: bool) -> None:
    """After training (rank 0): the final metrics, the run's files and, for a config that holds an
    ``experiment`` (eTraM), its experiment record into its MLflow run, then its end status."""
    import glob
    import json

    from ..tracking import continue_run

    run = continue_run(cfg.work_dir)
    if run is None:
        return
    final_file, final, step = osp.join(cfg.work_dir, "final_metrics.json"), None, 0
    if not stopped and osp.isfile(final_file):
        with open(final_file) as f:
            metrics = json.load(f)
        final, step = {"val": metrics.get("val", {})}, metrics.get("iter", 0)
    config_dump = osp.join(cfg.work_dir, osp.basename(cfg.filename)) if cfg.filename else ""
    scalars = sorted(glob.glob(osp.join(cfg.work_dir, "*", "vis_data", "scalars.json")))
    files = [config_dump, osp.join(cfg.work_dir, "run_config.json"), final_file, *scalars[-1:]]
    status = "KILLED" if stopped else "FINISHED"
    run.close(status, final, step=step, files=files, folders={"record": experiment_record(cfg)})


def experiment_record(cfg: Config) -> List[str]:
    """The experiment record of a config that holds ``experiment``, in ``<work_dir>/record`` ([] without)."""
    from ..experiments.records import RecordError, record_for_run

    if not cfg.get("experiment") or not cfg.filename or not osp.isfile(cfg.filename):
        return []
    try:
        return record_for_run(cfg.filename, osp.join(cfg.work_dir, "record"))
    except RecordError as e:  # a record that cannot be written must not fail a finished run
        print_log(f"experiment record not written: {e}", logger="current", level=logging.WARNING)
        return []


def checkpoint_dir(cfg: Config) -> str:
    """Where the checkpoint hook writes: ``out_dir/<work dir name>`` when it has an ``out_dir``, else the work dir."""
    out_dir = ((cfg.get("default_hooks") or {}).get("checkpoint") or {}).get("out_dir")
    if out_dir is None:
        return cfg.work_dir
    return osp.join(out_dir, osp.basename(cfg.work_dir.rstrip(osp.sep)))


def resolve_resume(cfg: Config, from_work_dir: bool) -> List[str]:
    """Point ``cfg.load_from`` at the checkpoint to resume from; return warnings for the run's log.

    ``from_work_dir`` (``--resume``): the checkpoint ``last_checkpoint`` names when it is intact, else the
    newest intact ``iter_*.pth`` / ``epoch_*.pth`` (each skipped file named), else a fresh start (the
    config's own ``load_from``, if any, still loads). Otherwise ``resume=True`` with an explicit
    ``load_from`` must name an intact checkpoint (ConfigError).
    """
    if not cfg.get("resume"):
        return []
    if not from_work_dir and cfg.get("load_from"):
        problem = checkpoint_problem(cfg.load_from)
        if problem:
            raise ConfigError(
                f"load_from {cfg.load_from} (resume=True) cannot be resumed from: {problem}. Pass an intact "
                "checkpoint, or use --resume alone to continue from the newest intact one in the work dir"
            )
        return []
    folder = checkpoint_dir(cfg)
    template = ((cfg.get("default_hooks") or {}).get("checkpoint") or {}).get("filename_tmpl")
    patterns = RESUME_PATTERNS + ((template.replace("{}", "*"),) if template else ())
    chosen, warnings = choose_mm_resume_checkpoint(cfg.work_dir, folder, patterns)
    if chosen is None:
        cfg.resume = False  # mmengine would resume from a pretrained load_from instead
        what = "no intact checkpoint" if warnings else "no checkpoint"
        return warnings + [f"--resume: {what} in {folder}; training starts from the beginning"]
    cfg.load_from = str(chosen)
    return warnings


# Keys that may differ between the starts of one run: where things are and how they run, not what
# is trained. Dataset roots move between machines ($RAT_DATASETS is resolved when the config loads);
# mmengine still compares the dataset's classes when it resumes.
RUN_INDEPENDENT_PREFIXES = (
    "resume",
    "load_from",
    "launcher",
    "work_dir",
    "env_cfg",
    "model_wrapper_cfg",
    "log_level",
    "log_processor",
    "visualizer",
    "vis_backends",
    "default_hooks.logger",
    "default_hooks.visualization",
)
RUN_INDEPENDENT_LEAVES = ("data_root", "ann_file", "num_workers", "persistent_workers", "pin_memory")


def comparable_config(cfg: Config) -> Tuple[Dict[str, object], List[str]]:
    """(the flattened config, the keys of it that may differ between starts of the same run)."""
    flat = run_record.flatten_config(cfg)
    # the loop as the config names it: prepare_training's reproducible subclass trains the same thing
    loop = flat.get("train_cfg.type")
    if isinstance(loop, str) and loop.startswith("Reproducible"):
        flat["train_cfg.type"] = loop[len("Reproducible") :]
    ignore = [k for k in flat if k.rsplit(".", 1)[-1] in RUN_INDEPENDENT_LEAVES]
    return flat, [*RUN_INDEPENDENT_PREFIXES, *ignore]


def check_run_config(cfg: Config) -> None:
    """Refuse (``RunConfigChangedError``, a ConfigError naming the keys) a work dir whose run had another config."""
    flat, ignore = comparable_config(cfg)
    run_record.check_same_config(cfg.work_dir, flat, ignore=ignore, what="training run")


def record_run_config(cfg: Config, runner: Runner) -> Path:
    """Write ``<work_dir>/run_config.json``: the flattened config, the seed used and the deterministic settings."""
    randomness = cfg.get("randomness") or {}
    reproducibility = run_record.reproducibility_settings(runner.seed, randomness.get("deterministic", False))
    reproducibility["diff_rank_seed"] = bool(randomness.get("diff_rank_seed", False))
    strategy = cfg.get("strategy") or {}
    if strategy.get("type") == "SafeDeepSpeedStrategy":  # what DeepSpeed was given, readable
        from ..utils.atomic import atomic_write_json
        from .deepspeed import CONFIG_FILE

        atomic_write_json(Path(cfg.work_dir) / CONFIG_FILE, strategy["config"], indent=2)
    return run_record.record_run_config(cfg.work_dir, comparable_config(cfg)[0], reproducibility)


def launch_rank(cfg: Config) -> int:
    """This process's global rank before torch.distributed starts (0 without a launcher)."""
    if cfg.get("launcher", "none") == "none":
        return 0
    from ..cluster import detect_environment

    return detect_environment().rank


# ----------------------------------------------------------------------------- testing

_FILE_SUFFIXES = (".pkl", ".pickle", ".json", ".png", ".npy", ".npz", ".txt", ".csv", ".pth")


def prepare_testing(cfg: Config, checkpoint: str, out=None) -> Config:
    """Load ``checkpoint`` strictly (:class:`~rat_plugins.mm.hooks.CheckpointFitHook`) and dump predictions
    to ``out`` as OpenMMLab's own test tools do: mmdet, a ``DumpDetResults`` pickle; mmseg, a folder of
    masks (``output_dir`` + ``keep_results`` of ``IoUMetric``)."""
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ConfigError(f"checkpoint {checkpoint} cannot be loaded: {problem}. Pass an intact checkpoint")
    cfg.load_from = checkpoint
    cfg.resume = False
    custom = list(cfg.get("custom_hooks") or [])
    if not any(isinstance(h, dict) and h.get("type") == "CheckpointFitHook" for h in custom):
        custom.append(dict(type="CheckpointFitHook"))
    cfg.custom_hooks = custom
    if out is None:
        return cfg
    scope = cfg.get("default_scope")
    evaluator = cfg.get("test_evaluator")
    if scope == "mmdet":
        if not str(out).endswith((".pkl", ".pickle")):
            raise ConfigError(
                f"--out {out}: for an mmdet config --out is the predictions file, a pickle: give it a .pkl or "
                ".pickle name (e.g. --out results.pkl)"
            )
        dump = dict(type="DumpDetResults", out_file_path=str(out))
        cfg.test_evaluator = [*evaluator, dump] if isinstance(evaluator, (list, tuple)) else [evaluator, dump]
    elif scope == "mmseg":
        if Path(out).is_file() or Path(out).suffix.lower() in _FILE_SUFFIXES:
            raise ConfigError(
                f"--out {out}: for an mmseg config --out is a folder for the predicted masks (one PNG per image), "
                "not a file: give a folder name (e.g. --out work_dirs/predictions)"
            )
        for metric in evaluator if isinstance(evaluator, (list, tuple)) else [evaluator]:
            metric["output_dir"] = str(out)
            metric["keep_results"] = True
    else:
        raise ConfigError(f"--out: supported for mmseg and mmdet configs (default_scope), this one has {scope!r}")
    return cfg


def write_final_metrics(runner) -> str:
    """``<work_dir>/final_metrics.json``: where training ended and the last validation metrics, written
    last (atomically), so its presence marks a finished run."""
    from ..utils.atomic import atomic_write_json

    scalars = runner.message_hub.log_scalars
    val = {k[len("val/") :]: float(v.current()) for k, v in scalars.items() if k.startswith("val/")}
    path = osp.join(runner.work_dir, "final_metrics.json")
    atomic_write_json(path, dict(val=val, iter=runner.iter, epoch=runner.epoch), indent=1)
    return path
