"""Training loop pieces for LazyConfig experiments: gradient accumulation, CPU-capable DDP, epoch
schedules, the device, final test evaluation, peak memory, override checking.

``tools/lazyconfig_train_net.py`` is a thin CLI over :func:`main`; the configs also run under
detectron2's stock ``tools/lazyconfig_train_net.py`` (without these extras).
"""

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
from torch.nn.parallel import DistributedDataParallel

from ..utils.atomic import atomic_write_json
from ..utils.config_keys import ConfigError, config_keys, did_you_mean
from .schedule import set_epoch_schedule

__all__ = [
    "AccumulatingTrainer",
    "PeakMemoryHook",
    "check_overrides",
    "resolve_device",
    "do_test",
    "do_train",
    "main",
    "ConfigError",
]

logger = logging.getLogger("detectron2")


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
            sync = (
                nullcontext() if last or not isinstance(self.model, DistributedDataParallel) else self.model.no_sync()
            )
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


def do_train(args, cfg):
    accumulation = _micro_batching(cfg, cfg.train.get("micro_batch_size") or None)
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = _build_loader(cfg.dataloader.train)
    model = create_ddp_model(model, **_ddp_kwargs(cfg))
    if cfg.train.amp.enabled:
        if accumulation > 1:
            raise ConfigError("train.amp.enabled with gradient accumulation is not supported")
        trainer = AMPTrainer(model, train_loader, optim)
    else:
        trainer = AccumulatingTrainer(model, train_loader, optim, accumulation=accumulation)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            PeakMemoryHook(cfg.train.device),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
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
        atomic_write_json(
            os.path.join(cfg.train.output_dir, "final_metrics.json"),
            dict(test=result, max_iter=cfg.train.max_iter, train_seconds_this_session=time.time() - started),
            indent=1,
            default=float,
        )
    return result


def load_config(args):
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
    if "epochs" in cfg.train and "num_train_images" in cfg.train:  # recomputed after the overrides
        set_epoch_schedule(cfg.train, cfg.get("lr_multiplier"), cfg.dataloader)
    cfg.train.device = resolve_device(cfg.train.device)
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
            atomic_write_json(os.path.join(cfg.train.output_dir, "eval_metrics.json"), result, indent=1, default=float)
        print(result)
        return result
    try:
        return do_train(args, cfg)
    except FloatingPointError as e:
        raise SystemExit(
            f"error: training diverged ({str(e).splitlines()[0]}). Lower the learning "
            f"rate (optimizer.lr=...), lengthen the warm-up, or check the data."
        ) from e


def run_guarded(fn, *args):
    """Turn ConfigError into one clear message instead of a traceback."""
    try:
        return fn(*args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
