"""``--auto-batch`` for detectron2 runs: probe real steps of the built model on one real batch
(:mod:`rat_plugins.engine.batch_fit`), then train with that micro-batch and accumulation."""

import logging
from itertools import islice

import torch
from detectron2.config import instantiate
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from ..engine.batch_fit import load_plan, optimizer_state_copies, plan_key, probe_micro_batch, save_plan
from ..engine.reproducible import preserved_random_state
from ..utils.config_keys import ConfigError

__all__ = ["fit_batch"]

logger = logging.getLogger("detectron2")


def fit_batch(cfg, model, optimizer, flat_config: dict) -> int:
    """The micro-batch per process for this run (cached in the work dir); every process gets the smallest."""
    world = comm.get_world_size()
    total = cfg.dataloader.train.total_batch_size
    if total % world:
        raise ConfigError(f"the batch ({total}) must be a multiple of the number of processes ({world})")
    per_process = total // world
    device = str(cfg.train.device)
    key = plan_key(flat_config, torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", world)
    plan = load_plan(cfg.train.output_dir, key)
    if plan is not None:
        logger.info("Auto batch: %s (the plan in %s)", plan.describe(), cfg.train.output_dir)
    else:
        with preserved_random_state():  # a resumed run reads the plan and skips the probe: same streams
            plan = _probe(cfg, model, optimizer, per_process, device, key)
        if comm.is_main_process():
            save_plan(cfg.train.output_dir, plan)
        logger.info("Auto batch: %s", plan.describe())
    micro = plan.micro_batch
    if world > 1:  # the process with the least memory decides
        micro = min(comm.all_gather(micro))
    return micro


def _probe(cfg, model, optimizer, per_process: int, device: str, key: str):
    batch = next(iter(instantiate(cfg.dataloader.train)))  # one real batch of the config's per-process size

    def loss_of(m):
        return sum(model(list(islice(batch, m))).values())

    with EventStorage():  # the model's training forward logs to one (thrown away: a probe is no iteration)
        plan = probe_micro_batch(
            model,
            loss_of,
            per_process,
            device,
            cfg.train.get("memory_budget_gb"),
            optimizer=optimizer,
            state_copies=optimizer_state_copies(optimizer),
        )
    plan.key = key
    return plan
