"""``--auto-batch`` for mmseg / mmdet runs.

The loader keeps the config's batch; each training iteration splits it into micro-batches whose
gradients are accumulated before the one optimizer step (:func:`micro_batched_train_step`, the
counterpart of detectron2's ``AccumulatingTrainer``). Iterations, their count, the LR schedule,
checkpoint names and logging intervals stay those of the config, which mmengine's
``accumulative_counts`` (one iteration per micro-batch) would change. The micro-batch is the
largest that fits (:mod:`rat_plugins.engine.batch_fit`, probed on one real batch of the run).
"""

import types
from contextlib import nullcontext
from typing import Dict

import torch
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from ..engine.batch_fit import load_plan, optimizer_state_copies, plan_key, probe_micro_batch, save_plan
from ..engine.reproducible import preserved_random_state

__all__ = ["fit_runner_batch", "micro_batched_train_step", "split_batch"]


def split_batch(data: Dict, parts: int):
    """A pseudo-collated batch (``inputs`` / ``data_samples`` lists) as ``parts`` equal consecutive chunks."""
    size = len(data["inputs"])
    step = size // parts
    return [{k: v[i * step : (i + 1) * step] for k, v in data.items()} for i in range(parts)]


def _with_chunk(model, data, optim_wrapper):
    module = model.module if is_model_wrapper(model) else model
    with optim_wrapper.optim_context(model):
        data = module.data_preprocessor(data, True)
        losses = model._run_forward(data, mode="loss")
    return module.parse_losses(losses)


def micro_batched_train_step(accumulation: int):
    """A ``train_step`` (for a model or its DDP wrapper) that accumulates ``accumulation`` micro-batches."""

    def train_step(self, data, optim_wrapper):
        chunks = split_batch(data, accumulation)
        summed: Dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            # gradients are all-reduced once, with the last micro-batch
            sync = self.no_sync() if hasattr(self, "no_sync") and not last else nullcontext()
            with sync:
                loss, log_vars = _with_chunk(self, chunk, optim_wrapper)
                optim_wrapper.backward(loss / accumulation)
            for key, value in log_vars.items():
                summed[key] = summed.get(key, 0.0) + value / accumulation
        optim_wrapper.step()
        optim_wrapper.zero_grad()
        return summed

    return train_step


def fit_runner_batch(runner, cfg, budget_gb=None) -> int:
    """Probe, plan (cached in the work dir) and install micro-batching on ``runner``; return the accumulation."""
    from mmengine.dist import broadcast_object_list, get_rank, get_world_size

    from .runner import comparable_config

    per_process = int(cfg.train_dataloader.batch_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    flat, ignore = comparable_config(cfg)
    key = plan_key({k: v for k, v in flat.items() if not k.startswith(tuple(ignore))}, device, get_world_size())
    plan = load_plan(cfg.work_dir, key)
    if plan is None:
        with preserved_random_state():  # a resumed run reads the plan and skips the probe: same streams
            plan = _probe(runner, cfg, per_process, device, budget_gb)
        plan.key = key
        if get_rank() == 0:
            save_plan(cfg.work_dir, plan)
        print_log(f"Auto batch: {plan.describe()}", logger="current")
    else:
        print_log(f"Auto batch: {plan.describe()} (the plan in {cfg.work_dir})", logger="current")
    if get_world_size() > 1:  # every process splits its batch alike: rank 0's plan
        shared = [plan]
        broadcast_object_list(shared, src=0)
        plan = shared[0]
    if plan.accumulation > 1:
        runner.model.train_step = types.MethodType(micro_batched_train_step(plan.accumulation), runner.model)
    return plan.accumulation


def _probe(runner, cfg, per_process: int, device: str, budget_gb):
    from mmengine.runner import Runner

    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    batch = next(iter(Runner.build_dataloader(dict(cfg.train_dataloader), seed=0)))

    def loss_of(m):
        chunk = {k: v[:m] for k, v in batch.items()}
        return model.parse_losses(model(**model.data_preprocessor(chunk, True), mode="loss"))[0]

    optimizer_type = (cfg.get("optim_wrapper") or {}).get("optimizer", {}).get("type", "AdamW")
    copies = optimizer_state_copies(type_name=optimizer_type)
    return probe_micro_batch(model, loss_of, per_process, device, budget_gb, state_copies=copies)
