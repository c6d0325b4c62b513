"""Training loop pieces for LazyConfig experiments: gradient accumulation, CPU-capable DDP,
epoch schedules, final test evaluation, peak memory, config-key checking.

``tools/lazyconfig_train_net.py`` is a thin CLI over :func:`main`; configs also run unchanged
under detectron2's stock ``tools/lazyconfig_train_net.py`` (without the extras noted here).
"""
import difflib
import json
import logging
import os
import resource
import sys
import time
from contextlib import nullcontext

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from .._atomic import atomic_write_text
from ..engine.schedule import epoch_schedule

__all__ = ["AccumulatingTrainer", "PeakMemoryHook", "apply_epoch_schedule", "check_overrides",
           "do_test", "do_train", "main", "ConfigError"]

logger = logging.getLogger("detectron2")


class ConfigError(ValueError):
    """A config or command-line override that cannot be used as given."""


class AccumulatingTrainer(SimpleTrainer):
    """SimpleTrainer whose optimizer step sums the gradients of ``accumulation`` micro-batches.

    Each micro-batch loss is divided by ``accumulation`` so the update equals one step on the
    concatenated batch for models whose loss is a per-batch mean and that have no batch
    statistics (LN/GN, frozen BN). DDP gradient all-reduce runs on the last micro-batch only.
    """

    def __init__(self, model, data_loader, optimizer, accumulation: int = 1, **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        if accumulation < 1:
            raise ConfigError(f"gradient accumulation must be >= 1, got {accumulation}")
        self.accumulation = accumulation

    def run_step(self):
        assert self.model.training, "[AccumulatingTrainer] model was changed to eval mode!"
        self.optimizer.zero_grad()
        data_time, summed = 0.0, {}
        for i in range(self.accumulation):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            last = i == self.accumulation - 1
            sync = nullcontext() if last or not isinstance(self.model, DistributedDataParallel) \
                else self.model.no_sync()
            with sync:
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
    flat = set()

    def walk(node, prefix):
        items = node.items() if isinstance(node, dict) or OmegaConf.is_dict(node) else enumerate(node)
        for k, v in items:
            key = f"{prefix}{k}"
            flat.add(key)
            if isinstance(v, (dict, list)) or OmegaConf.is_dict(v) or OmegaConf.is_list(v):
                walk(v, key + ".")  # list items by index, as OmegaConf addresses them (a.0.b)

    walk(cfg, "")
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+")
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if item.startswith("+") or key in flat:
            continue
        close = difflib.get_close_matches(key, sorted(flat), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown config key {key!r} in override {item!r}.{hint} "
                          f"(prefix the override with '+' to add a new key on purpose)")


def apply_epoch_schedule(cfg) -> None:
    """Recompute iteration counts from ``train.epochs`` after overrides changed batch or epochs.

    Configs built with ``rat_plugins.detectron2.schedule.set_epoch_schedule`` keep
    ``train.epochs`` and ``train.num_train_images``; the stock tool uses the values the config
    computed itself.
    """
    train = cfg.train
    if "epochs" not in train or "num_train_images" not in train:
        return
    batch = cfg.dataloader.train.total_batch_size
    sched = epoch_schedule(train.num_train_images, batch, train.epochs, train.get("warmup_iters", 500))
    train.max_iter = sched.max_iter
    train.eval_period = sched.iters_per_epoch
    train.checkpointer.period = sched.iters_per_epoch
    if "lr_multiplier" in cfg and "scheduler" in cfg.lr_multiplier:
        cfg.lr_multiplier.scheduler.milestones = list(sched.milestones)
        cfg.lr_multiplier.scheduler.values = list(sched.lr_factors)
        cfg.lr_multiplier.scheduler.num_updates = sched.max_iter
        cfg.lr_multiplier.warmup_length = sched.warmup_fraction


def _micro_batching(cfg, micro_batch):
    """Set the loader's batch to the micro-batch; return the accumulation factor."""
    total = cfg.dataloader.train.total_batch_size
    if not micro_batch or micro_batch * comm.get_world_size() == total:
        return 1
    per_step = micro_batch * comm.get_world_size()
    if total % per_step:
        raise ConfigError(f"the batch ({total}) must be a multiple of micro-batch x processes "
                          f"({micro_batch} x {comm.get_world_size()})")
    cfg.dataloader.train.total_batch_size = per_step
    return total // per_step


def do_test(cfg, model, loader_key="test"):
    if "evaluator" not in cfg.dataloader or loader_key not in cfg.dataloader:
        return None
    evaluator = cfg.dataloader.evaluator
    if loader_key != "test" and f"{loader_key}_evaluator" in cfg.dataloader:
        evaluator = cfg.dataloader[f"{loader_key}_evaluator"]
    ret = inference_on_dataset(model, instantiate(cfg.dataloader[loader_key]), instantiate(evaluator))
    if comm.is_main_process():
        print_csv_format(ret)
    return ret


def _ddp_kwargs(cfg):
    kwargs = dict(cfg.train.ddp)
    if not str(cfg.train.device).startswith("cuda"):
        kwargs["device_ids"] = None  # CPU modules take no device ids (gloo backend)
    return kwargs


def do_train(args, cfg):
    accumulation = _micro_batching(cfg, cfg.train.get("micro_batch_size") or None)
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **_ddp_kwargs(cfg))
    if cfg.train.amp.enabled:
        if accumulation > 1:
            raise ConfigError("train.amp.enabled with gradient accumulation is not supported")
        trainer = AMPTrainer(model, train_loader, optim)
    else:
        trainer = AccumulatingTrainer(model, train_loader, optim, accumulation=accumulation)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        PeakMemoryHook(cfg.train.device),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])
    if accumulation > 1:
        logger.info("Gradient accumulation: %d micro-batches of %d images (all processes) per optimizer step",
                    accumulation, cfg.dataloader.train.total_batch_size)
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    started = time.time()
    trainer.train(start_iter, cfg.train.max_iter)
    result = None
    if "final_test" in cfg.dataloader:
        logger.info("Final evaluation on the test split")
        result = do_test(cfg, model, "final_test")
    if comm.is_main_process():
        # Marks the run finished (run_all_ofat.sh skips it; summarize_ofat.py reads it).
        _write_json_atomic(os.path.join(cfg.train.output_dir, "final_metrics.json"), dict(
            test=result, max_iter=cfg.train.max_iter, train_seconds_this_session=time.time() - started))
    return result


def _write_json_atomic(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1, default=float))


def load_config(args):
    if not os.path.isfile(args.config_file):
        raise ConfigError(f"config file not found: {args.config_file}")
    try:
        cfg = LazyConfig.load(args.config_file)
    except FileNotFoundError as e:  # a dataset the config registers at load time is missing
        raise ConfigError(str(e)) from e
    check_overrides(cfg, args.opts)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if getattr(args, "micro_batch", None):
        cfg.train.micro_batch_size = args.micro_batch
    apply_epoch_schedule(cfg)
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; "
                          "add the override train.device=cpu")
    return cfg


def main(args):
    cfg = load_config(args)
    default_setup(cfg, args)
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model, **_ddp_kwargs(cfg))
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        result = {"valid": do_test(cfg, model)}
        if "final_test" in cfg.dataloader:
            result["test"] = do_test(cfg, model, "final_test")
        if comm.is_main_process():
            _write_json_atomic(os.path.join(cfg.train.output_dir, "eval_metrics.json"), result)
        print(result)
        return result
    try:
        return do_train(args, cfg)
    except FloatingPointError as e:
        raise SystemExit(f"error: training diverged ({str(e).splitlines()[0]}). Lower the learning "
                         f"rate (optimizer.lr=...), lengthen the warm-up, or check the data.") from e


def run_guarded(fn, *args):
    """Turn ConfigError into one clear message instead of a traceback."""
    try:
        return fn(*args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

