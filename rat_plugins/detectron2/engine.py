"""Training loop pieces for LazyConfig experiments: gradient accumulation, CPU-capable DDP, epoch
schedules, the device, final test evaluation, peak memory, override checking, and runs that lose
nothing: atomic checkpoints, verified resume, a checkpoint and exit 0 on SIGTERM / SIGINT, one run
per work dir, the run's config recorded and compared on every restart, strict evaluation loading.

``tools/lazyconfig_train_net.py`` is a thin CLI over :func:`launch_from_cli` (checks, work-dir
lock, signals, then detectron2's ``launch`` of :func:`main` in each process); the configs also run
under detectron2's stock ``tools/lazyconfig_train_net.py`` (without these extras).
"""

import copy
import errno
import json
import logging
import multiprocessing
import os
import resource
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import List, Optional

import torch
from detectron2.config import LazyCall as L, LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks, launch
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf
from torch.multiprocessing import ProcessExitedException
from torch.nn.parallel import DistributedDataParallel

from ..cluster.environment import coordinates_line
from ..cluster.requeue import requeue_command, requeue_current_job
from ..data.subset import fraction_count
from ..engine.checkpoints import checkpoint_problem
from ..engine.distributed import closing_process_group
from ..engine.reproducible import ReplayableBatches
from ..engine.run_record import check_same_config, flatten_config, record_run_config, reproducibility_settings
from ..engine.signals import GracefulStop, die_with_parent
from ..engine.workdir_lock import WorkDirLock
from ..models.checkpointing import enable_activation_checkpointing
from ..utils.atomic import DiskFullError, atomic_write_json
from ..utils.config_keys import ConfigError, config_keys, did_you_mean
from .batch_fit import fit_batch
from .checkpoint import RunCheckpointer, require_checkpoint_file
from .data import dataset_fraction, validate_lazy_config_data
from .hooks import (
    BestModelCheckpointer,
    ClipGradNorm,
    EarlyStopping,
    SafePeriodicCheckpointer,
    StopOnSignal,
    TrainingAborted,
    TrainingEndedEarly,
    TrainingStopped,
    read_best_record,
)
from .schedule import set_epoch_schedule
from .tracking import MLflowWriter, end_tracking, start_tracking

__all__ = [
    "AccumulatingTrainer",
    "PeakMemoryHook",
    "check_overrides",
    "resolve_device",
    "do_test",
    "do_train",
    "main",
    "load_config",
    "precheck",
    "check_run_config",
    "run_config_flat",
    "launch_from_cli",
    "run_guarded",
    "ConfigError",
]

logger = logging.getLogger("detectron2")


class AccumulatingTrainer(SimpleTrainer):
    """SimpleTrainer whose optimizer step sums the gradients of ``accumulation`` micro-batches.

    Each micro-batch loss is divided by ``accumulation`` so the update equals one step on the
    concatenated batch for models whose loss is a per-batch mean and that have no batch
    statistics (LN/GN, frozen BN). DDP gradient all-reduce runs on the last micro-batch only.
    """

    def __init__(self, model, data_loader, optimizer, accumulation: int = 1, autocast_dtype=None, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        if accumulation < 1:
            raise ConfigError(f"gradient accumulation must be >= 1, got {accumulation}")
        self.accumulation = accumulation
        self.autocast_dtype = autocast_dtype  # bfloat16: mixed precision without loss scaling (CPU or CUDA)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device, dtype=self.autocast_dtype)

    def run_step(self):
        assert self.model.training, "[AccumulatingTrainer] model was changed to eval mode!"
        self.optimizer.zero_grad()
        data_time, summed = 0.0, {}
        for i in range(self.accumulation):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            last = i == self.accumulation - 1
            sync = (
                nullcontext() if last or not isinstance(self.model, DistributedDataParallel) else self.model.no_sync()
            )
            with sync, self._autocast():
                loss_dict = self.model(data)
                if isinstance(loss_dict, torch.Tensor):
                    loss_dict = {"total_loss": loss_dict}
                (sum(loss_dict.values()) / self.accumulation).backward()
            for k, v in loss_dict.items():
                summed[k] = summed.get(k, 0.0) + v.detach() / self.accumulation
        self.after_backward()
        self._write_metrics(summed, data_time)
        self.optimizer.step()


class PeakMemoryHook(hooks.HookBase):
    """Puts the peak memory (CUDA allocated, else process RSS) in the event storage, in MB."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()

    def after_step(self):
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:  # ru_maxrss is in KiB on Linux
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        get_event_storage().put_scalar("peak_memory_mb", peak, smoothing_hint=False)


def check_overrides(cfg, overrides) -> None:
    """Refuse ``key=value`` overrides whose key is not in the config (typos would be ignored)."""
    known = config_keys(cfg)
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+")
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if item.startswith("+") or key in known:
            continue
        raise ConfigError(
            f"unknown config key {key!r} in override {item!r}.{did_you_mean(key, known)} "
            f"(prefix the override with '+' to add a new key on purpose)"
        )


def resolve_device(device) -> str:
    """``auto``: cuda if available, else cpu; a cuda device without CUDA is a ConfigError."""
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device is {device!r} but no CUDA device is available; add the override train.device=cpu"
        )
    return device


def _micro_batching(cfg, micro_batch):
    """Set the loader's batch to the micro-batch; return the accumulation factor."""
    total = cfg.dataloader.train.total_batch_size
    if not micro_batch or micro_batch * comm.get_world_size() == total:
        return 1
    per_step = micro_batch * comm.get_world_size()
    if total % per_step:
        raise ConfigError(
            f"the batch ({total}) must be a multiple of micro-batch x processes "
            f"({micro_batch} x {comm.get_world_size()})"
        )
    cfg.dataloader.train.total_batch_size = per_step
    return total // per_step


def _build_loader(node):
    """Instantiate a data loader; its datasets register now, so a missing one is a ConfigError."""
    try:
        return instantiate(node)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e


def _train_loader_node(cfg):
    """``dataloader.train``, its dataset narrowed to ``train.dataset_fraction`` of the images when set."""
    fraction = cfg.train.get("dataset_fraction")
    if not fraction:
        return cfg.dataloader.train
    # its interpolations (``${...classes}``) resolved where they stand: one level deeper they would not be
    dataset = OmegaConf.to_container(cfg.dataloader.train.dataset, resolve=True)
    node = copy.deepcopy(cfg.dataloader.train)
    node.dataset = L(dataset_fraction)(dataset=dataset, fraction=fraction)
    return node


def do_test(cfg, model, loader_key="test"):
    if "evaluator" not in cfg.dataloader or loader_key not in cfg.dataloader:
        return None
    evaluator = cfg.dataloader.evaluator
    if loader_key != "test" and f"{loader_key}_evaluator" in cfg.dataloader:
        evaluator = cfg.dataloader[f"{loader_key}_evaluator"]
    loader = _build_loader(cfg.dataloader[loader_key])  # first: the evaluator reads the registration
    ret = inference_on_dataset(model, loader, instantiate(evaluator))
    if comm.is_main_process():
        print_csv_format(ret)
    return ret


def _ddp_kwargs(cfg):
    kwargs = dict(cfg.train.ddp)
    if not str(cfg.train.device).startswith("cuda"):
        kwargs["device_ids"] = None  # CPU modules take no device ids (gloo backend)
    return kwargs


# -- the run record: what a restart is compared with ---------------------------------------------
# keys that may differ between a run and its resume: where it runs and how fast, not what it computes
RESUME_MAY_CHANGE = (
    "train.output_dir",
    "train.device",
    "train.micro_batch_size",
    "train.log_period",
    "train.tracking",
    "train.activation_checkpointing",  # memory, not what is computed
    "train.auto_batch",
    "train.memory_budget_gb",
)
RESUME_MAY_CHANGE_SUFFIXES = (".num_workers", ".feature_cache_dir")


def _named_targets(value):
    """A config container with classes and functions as ``module.qualname`` (their repr holds an address)."""
    if isinstance(value, dict):
        return {k: _named_targets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_named_targets(v) for v in value]
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    return value


def run_config_flat(cfg) -> dict:
    """The config as ``{"a.b": value}``, interpolations unresolved (``${...train.output_dir}/eval``),
    so the record does not depend on where the work dir is."""
    container = OmegaConf.to_container(copy.deepcopy(cfg), resolve=False)
    return flatten_config(_named_targets(container))


def _resume_may_change(flat) -> List[str]:
    return list(RESUME_MAY_CHANGE) + [k for k in flat if k.endswith(RESUME_MAY_CHANGE_SUFFIXES)]


def check_run_config_flat(cfg) -> dict:
    """The flat config less the keys a restart may change (the batch plan's key)."""
    flat = run_config_flat(cfg)
    ignore = tuple(_resume_may_change(flat))
    return {k: v for k, v in flat.items() if not k.startswith(ignore)}


def check_run_config(cfg) -> dict:
    """Refuse a work dir that holds a run started with another config; return the flat config."""
    flat = run_config_flat(cfg)
    check_same_config(cfg.train.output_dir, flat, ignore=_resume_may_change(flat), what="run")
    return flat


def _record_run(cfg) -> None:
    flat = check_run_config(cfg)
    settings = reproducibility_settings(cfg.train.seed, torch.are_deterministic_algorithms_enabled())
    settings.update(world_size=comm.get_world_size(), seed_of_each_process="train.seed + rank")
    path = record_run_config(cfg.train.output_dir, flat, settings)
    logger.info("Run config, seed %s and deterministic settings recorded in %s", cfg.train.seed, path)


# -- training ------------------------------------------------------------------------------------
# The stop signals of this process when launch_from_cli runs training in it (one process); the
# processes it spawns for DDP install their own in main().
_SESSION_STOP: Optional[GracefulStop] = None


@contextmanager
def _stop_signals():
    if _SESSION_STOP is not None:
        yield _SESSION_STOP
        return
    with GracefulStop() as stop:
        yield stop


def do_train(args, cfg, stop: Optional[GracefulStop] = None):
    """Train; returns the final test's results, or None when a stop signal ended training early."""
    tracked = start_tracking(cfg, args.config_file, run_config_flat(cfg))
    status = "FAILED"
    try:
        result = _train(args, cfg, stop, tracked)
        status = "FINISHED" if result is not _STOPPED else "KILLED"
        return None if result is _STOPPED else result
    finally:
        final_file, final = os.path.join(cfg.train.output_dir, "final_metrics.json"), None
        if status == "FINISHED" and tracked is not None and os.path.isfile(final_file):
            with open(final_file) as f:
                final = json.load(f)
        end_tracking(tracked, cfg, status, final)


_STOPPED = object()  # _train's result when a stop signal ended training early


def _train(args, cfg, stop, tracked):
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    if cfg.train.get("activation_checkpointing"):
        switched = enable_activation_checkpointing(model)
        if not switched:
            raise ConfigError("train.activation_checkpointing: this model has no blocks that can be checkpointed")
        logger.info("Activation checkpointing: %s", ", ".join(switched))
    micro_batch = cfg.train.get("micro_batch_size") or None
    if cfg.train.get("auto_batch"):
        if micro_batch:
            raise ConfigError("train.auto_batch chooses the micro-batch itself: drop train.micro_batch_size")
        micro_batch = fit_batch(cfg, model, optim, check_run_config_flat(cfg))
    accumulation = _micro_batching(cfg, micro_batch)
    # each batch reseeded by its number, and replayed on resume: a resumed run continues exactly
    train_loader = ReplayableBatches(_build_loader(_train_loader_node(cfg)), cfg.train.seed, comm.get_rank())
    model = create_ddp_model(model, **_ddp_kwargs(cfg))
    precision = _autocast_dtype(cfg)
    if precision == torch.float16:  # loss scaling: detectron2's AMPTrainer
        if accumulation > 1:
            raise ConfigError("train.amp with float16 and gradient accumulation is not supported; use bfloat16")
        trainer = AMPTrainer(model, train_loader, optim, precision=precision)
    else:
        trainer = AccumulatingTrainer(model, train_loader, optim, accumulation=accumulation, autocast_dtype=precision)
    checkpointer = RunCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            PeakMemoryHook(cfg.train.device),
            ClipGradNorm(cfg.train.clip_grad_norm) if cfg.train.get("clip_grad_norm") else None,
            SafePeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            _best_checkpointer(cfg, model) if comm.is_main_process() else None,
            _early_stopping(cfg),
            # after the checkpointer and the evaluation: see StopOnSignal
            StopOnSignal(stop or GracefulStop(), checkpointer),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter)
                + ([MLflowWriter(tracked)] if tracked else []),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )
    if accumulation > 1:
        logger.info(
            "Gradient accumulation: %d micro-batches of %d images (all processes) per optimizer step",
            accumulation,
            cfg.dataloader.train.total_batch_size,
        )
    if not args.resume and checkpointer.has_checkpoint() and comm.is_main_process():
        logger.warning(
            "Starting afresh (no --resume) in %s, which holds checkpoints (the last: %s): this run replaces "
            "them as it saves its own. Stop now and add --resume to continue that run instead",
            cfg.train.output_dir,
            checkpointer.get_checkpoint_file(),
        )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if checkpointer.resumed_from else 0
    train_loader.skip = start_iter * accumulation
    started, ended_early = time.time(), None
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except TrainingStopped as stopped:
        _report_stop(stopped, cfg)
        return _STOPPED
    except TrainingAborted as aborted:
        logger.error("%s", aborted.error)
        raise aborted.error from None
    except TrainingEndedEarly as early:
        logger.info("Early stopping after iteration %d: %s", early.iteration, early)
        if comm.is_main_process():
            checkpointer.save("model_final", iteration=early.iteration)
        ended_early = dict(iteration=early.iteration, metric=early.metric, best=early.best)
    result = None
    if "final_test" in cfg.dataloader:
        logger.info("Final evaluation on the test split")
        result = do_test(cfg, model, "final_test")
    best = _test_best_model(cfg, model)
    if comm.is_main_process():
        # Marks the run finished (run_all_ofat.sh skips it; summarize_ofat.py reads it).
        final = dict(test=result, max_iter=cfg.train.max_iter, train_seconds_this_session=time.time() - started)
        if best is not None:
            final["best"] = best
        if ended_early is not None:
            final["ended_early"] = ended_early
        atomic_write_json(os.path.join(cfg.train.output_dir, "final_metrics.json"), final, indent=1, default=float)
    return result


def _best_checkpointer(cfg, model):
    """``model_best.pth`` at the best ``train.best_checkpoint_metric`` of validation (None: off)."""
    metric = cfg.train.get("best_checkpoint_metric")
    if not metric or "test" not in cfg.dataloader or cfg.train.eval_period <= 0:
        return None
    saver = RunCheckpointer(model, cfg.train.output_dir, tag_last=False)  # a resume never starts from it
    per_epoch = cfg.train.eval_period if "epochs" in cfg.train else None  # the epoch schedule: one eval an epoch
    return BestModelCheckpointer(cfg.train.eval_period, saver, metric, iters_per_epoch=per_epoch)


def _early_stopping(cfg):
    """``train.early_stopping.patience`` evaluations without improvement end the run (None: off)."""
    section = cfg.train.get("early_stopping") or {}
    if not section.get("patience"):
        return None
    if cfg.train.eval_period <= 0 or "test" not in cfg.dataloader:
        raise ConfigError("train.early_stopping needs validation: a dataloader.test and train.eval_period > 0")
    metric = section.get("metric") or cfg.train.get("best_checkpoint_metric") or "bbox/AP50"
    patience = section["patience"]
    return EarlyStopping(cfg.train.eval_period, metric, patience, cfg.train.output_dir, section.get("min_delta", 0.0))


def _test_best_model(cfg, model) -> Optional[dict]:
    """The test split's metrics of ``model_best.pth`` with its record, or None (no best model, no test split).
    Loads the best weights into ``model``: call it last."""
    record = read_best_record(cfg.train.output_dir)
    path = os.path.join(cfg.train.output_dir, "model_best.pth")
    if comm.get_world_size() > 1:
        record = comm.all_gather(record)[0]
    if record is None or not os.path.isfile(path) or "final_test" not in cfg.dataloader:
        return None
    problem = checkpoint_problem(path)
    if problem is not None:
        logger.warning("The best validation model %s is not evaluated on the test split: %s", path, problem)
        return None
    logger.info(
        "Test split with the best validation model (%s %.4g at iteration %d)",
        record["metric"],
        record["value"],
        record["iteration"],
    )
    RunCheckpointer(model).load_strict(path)
    return dict(record, test=do_test(cfg, model, "final_test"))


def _report_stop(stopped: TrainingStopped, cfg) -> None:
    if not comm.is_main_process():
        return
    if stopped.checkpoint is None:
        logger.warning(
            "Stopped by %s before the first iteration: nothing new to save. Continue with --resume",
            stopped.signal_name,
        )
        return
    logger.warning(
        "Stopped by %s after iteration %d of %d: checkpoint %s. Continue with --resume (same config and "
        "train.output_dir=%s)",
        stopped.signal_name,
        stopped.iteration,
        cfg.train.max_iter,
        stopped.checkpoint,
        cfg.train.output_dir,
    )


def load_config(args, notes: Optional[List[str]] = None):
    """The LazyConfig with the overrides, its epoch schedule recomputed, the device resolved and the data checked.

    ``notes`` (a list) receives the lines the run's log should carry (explicit periods kept).
    """
    if not os.path.isfile(args.config_file):
        raise ConfigError(f"config file not found: {args.config_file}")
    try:
        cfg = LazyConfig.load(args.config_file)
    except FileNotFoundError as e:  # a dataset file the config reads (its image count) is missing
        raise ConfigError(str(e)) from e
    check_overrides(cfg, args.opts)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if getattr(args, "micro_batch", None):
        cfg.train.micro_batch_size = args.micro_batch
    _memory_switches(cfg, args)
    if cfg.train.get("dataset_fraction") and "num_train_images" in cfg.train:  # epochs of the subset
        cfg.train.num_train_images = fraction_count(cfg.train.num_train_images, cfg.train.dataset_fraction)
    if "epochs" in cfg.train and "num_train_images" in cfg.train:  # recomputed after the overrides
        explicit = [item.split("=", 1)[0].lstrip("+") for item in args.opts]
        kept = set_epoch_schedule(cfg.train, cfg.get("lr_multiplier"), cfg.dataloader, explicit=explicit)
        if notes is not None:
            notes.extend(kept)
    cfg.train.device = resolve_device(cfg.train.device)
    # every split's files, boxes and classes, before anything trains: the launcher's call fails a broken
    # test split in the first minute; each process's call gives its loaders the CheckedMapper (in cfg)
    validate_lazy_config_data(cfg)
    return cfg


def _memory_switches(cfg, args) -> None:
    """The CLI shortcuts into the config keys they stand for."""
    if getattr(args, "amp", False) or getattr(args, "amp_dtype", None):
        cfg.train.amp.enabled = True
    if getattr(args, "amp_dtype", None):
        cfg.train.amp.dtype = args.amp_dtype
    if getattr(args, "activation_checkpointing", False):
        cfg.train.activation_checkpointing = True
    if getattr(args, "clip_grad", None) is not None:
        cfg.train.clip_grad_norm = args.clip_grad
    if getattr(args, "auto_batch", False):
        cfg.train.auto_batch = True
    if getattr(args, "memory_budget_gb", None) is not None:
        cfg.train.memory_budget_gb = args.memory_budget_gb


def _autocast_dtype(cfg) -> Optional[torch.dtype]:
    """None (full precision) or the autocast type of ``train.amp``; float16 on CPU is refused with the fix."""
    amp = cfg.train.amp
    if not amp.enabled:
        return None
    name = str(amp.get("dtype", "float16"))
    if name not in ("float16", "bfloat16"):
        raise ConfigError(f"train.amp.dtype must be float16 or bfloat16, got {name!r}")
    if name == "float16" and not str(cfg.train.device).startswith("cuda"):
        raise ConfigError(
            "train.amp with float16 needs a CUDA device (loss scaling); on CPU use bfloat16: "
            "--amp-dtype bfloat16 (train.amp.dtype=bfloat16)"
        )
    return getattr(torch, name)


def _evaluate(cfg):
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    model = create_ddp_model(model, **_ddp_kwargs(cfg))
    if cfg.train.init_checkpoint:
        RunCheckpointer(model).load_strict(cfg.train.init_checkpoint)
    else:
        logger.warning(
            "--eval-only without train.init_checkpoint: evaluating the model as built (its backbone's own "
            "checkpoint, if any, and randomly initialised heads)"
        )
    result = {"valid": do_test(cfg, model)}
    if "final_test" in cfg.dataloader:
        result["test"] = do_test(cfg, model, "final_test")
    if comm.is_main_process():
        atomic_write_json(os.path.join(cfg.train.output_dir, "eval_metrics.json"), result, indent=1, default=float)
    print(result)
    return result


def _log_project_messages(output_dir, rank: int) -> None:
    """The project's own messages (resume choice, stop signals, caches) in the run's log.txt too.

    detectron2 caches setup_logger by its arguments: calling it again in a process adds nothing.
    """
    setup_logger(output_dir, distributed_rank=rank, name="rat_plugins", abbrev_name="rat")


def main(args):
    """One process of a run (detectron2's ``launch`` calls it in each)."""
    die_with_parent(only_when_asked=True)  # launch's child processes too, under an engine that tears workers down
    # a DDP process leaves its gloo / NCCL group before the interpreter finalizes (see engine.distributed)
    with closing_process_group():
        return _run_process(args)


def _run_process(args):
    notes: List[str] = []
    cfg = load_config(args, notes)
    with nullcontext() if args.eval_only else _stop_signals() as stop:
        default_setup(cfg, args)
        _log_project_messages(cfg.train.output_dir, comm.get_rank())
        line = coordinates_line(comm.get_rank(), comm.get_local_rank(), comm.get_world_size(), cfg.train.device)
        print(line, file=sys.stderr, flush=True)  # every process, once: a wrong rank mapping shows
        for note in notes:
            logger.info(note)
        if args.eval_only:
            return _evaluate(cfg)
        if comm.is_main_process():
            _record_run(cfg)
        try:
            return do_train(args, cfg, stop)
        except FloatingPointError as e:
            raise SystemExit(
                f"error: training diverged ({str(e).splitlines()[0]}). Lower the learning "
                f"rate (optimizer.lr=...), lengthen the warm-up, or check the data."
            ) from e


def run_guarded(fn, *args):
    """Turn a ConfigError (exit 2) or a full disk (exit 1) into one clear message instead of a traceback."""
    try:
        return fn(*args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if not isinstance(e, DiskFullError) and e.errno != errno.ENOSPC:
            raise
        message = e.strerror if isinstance(e, DiskFullError) else f"disk full ({e}); free space and resume"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


# -- the command line: checks, the work-dir lock and signals around detectron2's launch ----------
def precheck(cfg, args) -> None:
    """What can fail before any process starts, so a broken input fails in the first minute."""
    if cfg.train.init_checkpoint:
        require_checkpoint_file(cfg.train.init_checkpoint, "train.init_checkpoint")


def _pass_stop_to_workers(signal_name: str) -> None:
    """In the launching process of a multi-process run: the training processes do the stopping.

    They get SIGTERM whatever this process got: a Ctrl-C has reached them already (same process
    group), and a second SIGINT would make them stop without a checkpoint.
    """
    workers = multiprocessing.active_children()
    for worker in workers:
        try:
            os.kill(worker.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    logging.getLogger(__name__).warning(
        "%s: asked the %d training processes to save a checkpoint and stop (they receive SIGTERM)",
        signal_name,
        len(workers),
    )


def adopt_scheduler_ranks(args) -> None:
    """One process per rank started by a scheduler (``srun -n N``, blaunch, jsrun, mpirun) and no
    explicit ``--num-machines`` / ``--dist-url``: each process is a "machine" of one process, at the
    rank and master address the scheduler gives (GPU binding: one GPU per task, e.g. ``--gpus-per-task``)."""
    from detectron2.engine import default_argument_parser

    from ..cluster.environment import detect_environment

    env = detect_environment()
    explicit = args.num_machines != 1 or args.dist_url != default_argument_parser().get_default("dist_url")
    if not env.distributed or env.launcher == "torchrun" or explicit:
        return
    args.num_gpus, args.num_machines, args.machine_rank = 1, env.world_size, env.rank
    args.dist_url = f"tcp://{env.master_addr}:{env.master_port}"


def launch_from_cli(args) -> None:
    """The project's ``lazyconfig_train_net.py``: checks, lock, signals, then ``launch(main)``.

    The machine of rank 0 holds the work-dir lock for the whole run (released at exit, on errors
    and after a stop signal); a second run into the same ``train.output_dir`` refuses, naming the
    first one's pid and host. A training run stops on SIGTERM / SIGINT with a checkpoint, exit 0.
    """
    global _SESSION_STOP
    adopt_scheduler_ranks(args)
    cfg = run_guarded(load_config, args)  # config / override / data errors once, before launching
    run_guarded(precheck, cfg, args)
    spawns = args.num_gpus * args.num_machines > 1  # detectron2's launch starts a process per rank
    stop = None
    if not args.eval_only:
        stop = GracefulStop(on_request=_pass_stop_to_workers if spawns else None).install()
        _SESSION_STOP = None if spawns else stop
    lock = WorkDirLock(cfg.train.output_dir, what="tools/lazyconfig_train_net.py") if args.machine_rank == 0 else None
    try:
        if lock is not None:
            run_guarded(lock.acquire)
            if not args.eval_only:  # under the lock: no other run rewrites the record in between
                run_guarded(check_run_config, cfg)
            if spawns:  # this process's stop messages in the run's log, beside its processes' own
                _log_project_messages(cfg.train.output_dir, 0)
        launch(
            run_guarded,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(main, args),
        )
    except ProcessExitedException as e:
        if e.exit_code is not None and e.exit_code > 0:
            sys.exit(e.exit_code)  # the process printed why
        print(f"error: a training process ended without a message: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if lock is not None:
            lock.release()
        if stop is not None:
            stop.restore()
            _SESSION_STOP = None
    if stop is not None and stop.requested and lock is not None:
        _requeue_unfinished(cfg.train.output_dir)


def _requeue_unfinished(output_dir) -> None:
    """After a stop signal in a scheduler job: back into the queue (after the lock's release), so the
    job resumes from the checkpoint just saved; a run that finished meanwhile is left alone."""
    if requeue_command() is None or os.path.isfile(os.path.join(output_dir, "final_metrics.json")):
        return
    logging.getLogger(__name__).warning("%s", requeue_current_job()[1])
