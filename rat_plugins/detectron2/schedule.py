"""Epoch-based schedules written into a LazyConfig's ``train`` / ``lr_multiplier``.

What the user asked for wins, or the run refuses: when the project's tool recomputes a schedule
after the command-line overrides, a key given explicitly is never replaced by a derived value.
The keys that fix the run's length and learning-rate curve (``train.max_iter``, the scheduler's
milestones, values, ``num_updates`` and the warm-up length) contradict ``train.epochs`` when they
differ from what it gives: the run refuses and names the key to override instead. How often to
evaluate and checkpoint (``train.eval_period``, ``train.checkpointer.period``) contradicts nothing:
an explicit value is kept and the log says so.
"""

import math
from typing import Iterable, List, Optional

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ..engine.schedule import epoch_schedule
from ..utils.config_keys import ConfigError

__all__ = ["set_epoch_schedule", "multistep_with_warmup", "SCHEDULE_LENGTH_KEYS", "SCHEDULE_PERIOD_KEYS"]

# derived key -> what to override instead
SCHEDULE_LENGTH_KEYS = {
    "train.max_iter": "train.epochs",
    "lr_multiplier.scheduler.num_updates": "train.epochs",
    "lr_multiplier.scheduler.milestones": "train.epochs (the decays fall at 70 % and 90 % of the run)",
    "lr_multiplier.scheduler.values": "train.epochs (the rate drops x0.1 at each decay)",
    "lr_multiplier.warmup_length": "train.warmup_iters",
}
SCHEDULE_PERIOD_KEYS = ("train.eval_period", "train.checkpointer.period")


def multistep_with_warmup():
    """LazyCall of a warm-up + x0.1 multistep scheduler; ``set_epoch_schedule`` fills the numbers."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[0, 0], num_updates=1),
        warmup_length=0.0,
        warmup_factor=0.001,
    )


def _given(key: str, explicit: Iterable[str]) -> bool:
    return any(k == key or k.startswith(key + ".") for k in explicit)


def _same(given, derived) -> bool:
    if isinstance(derived, float) or isinstance(given, float):
        return math.isclose(float(given), float(derived), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(derived, (list, tuple)):
        given = list(given)
        return len(given) == len(derived) and all(_same(g, d) for g, d in zip(given, derived))
    return given == derived


def set_epoch_schedule(
    train,
    lr_multiplier,
    dataloader,
    epochs=None,
    num_images=None,
    warmup_iters=None,
    explicit: Optional[Iterable[str]] = None,
) -> List[str]:
    """Fill max_iter, warm-up, decay milestones, eval and checkpoint periods from epochs.

    iterations = ceil(``num_images`` / ``dataloader.train.total_batch_size``) x ``epochs``; the
    learning rate drops x0.1 at 70 % and 90 %; evaluation once an epoch; checkpoints once an epoch
    or, when an epoch is longer, every ``MAX_CHECKPOINT_PERIOD`` iterations
    (``rat_plugins.engine.schedule``), so a kill costs minutes, not an epoch. The inputs are kept in
    ``train.epochs`` / ``train.num_train_images`` / ``train.warmup_iters``; arguments left as None
    keep the values stored there, so the project's training tool can recompute everything after
    command-line overrides of the batch or the epochs.

    Args:
        train: the config's ``train`` node.
        lr_multiplier: a :func:`multistep_with_warmup` node, or None to leave the learning rate alone.
        dataloader: the config's ``dataloader`` node (its ``train.total_batch_size`` is the batch).
        explicit: dotted keys (``train.max_iter``) the user set on the command line; their values
            are in the nodes already.

    Returns:
        one line per explicit period kept instead of the derived one (for the run's log).

    Raises:
        ConfigError: an explicit length or learning-rate key contradicts the epoch schedule.
    """
    explicit = list(explicit or ())
    if epochs is not None:
        train.epochs = epochs
    if num_images is not None:
        train.num_train_images = num_images
    train.warmup_iters = warmup_iters if warmup_iters is not None else train.get("warmup_iters", 500)
    batch = dataloader.train.total_batch_size
    sched = epoch_schedule(train.num_train_images, batch, train.epochs, train.warmup_iters)
    derived = {"train.max_iter": sched.max_iter}
    if lr_multiplier is not None and "scheduler" in lr_multiplier:
        derived.update(
            {
                "lr_multiplier.scheduler.milestones": list(sched.milestones),
                "lr_multiplier.scheduler.values": list(sched.lr_factors),
                "lr_multiplier.scheduler.num_updates": sched.max_iter,
                "lr_multiplier.warmup_length": sched.warmup_fraction,
            }
        )
    nodes = {"train": train, "lr_multiplier": lr_multiplier}
    for key, value in derived.items():
        root, *path = key.split(".")
        node = nodes[root]
        for part in path[:-1]:
            node = node[part]
        if _given(key, explicit) and not _same(node[path[-1]], value):
            raise ConfigError(
                f"{key}={_show(node[path[-1]])} contradicts this config's epoch schedule, which derives it from "
                f"train.epochs={train.epochs} ({sched.iters_per_epoch} iterations an epoch: "
                f"{train.num_train_images} images at batch {batch}) as {_show(value)}. Override "
                f"{SCHEDULE_LENGTH_KEYS[key]} instead and drop {key}=..."
            )
        node[path[-1]] = value
    notes = []
    periods = {"train.eval_period": sched.iters_per_epoch, "train.checkpointer.period": sched.checkpoint_period}
    for key, value in periods.items():
        node = train if key == "train.eval_period" else train.checkpointer
        name = key.rsplit(".", 1)[1]
        if _given(key, explicit):
            if node[name] != value:
                notes.append(f"{key}={node[name]} given explicitly: kept (the epoch schedule would set {value})")
            continue
        node[name] = value
    return notes


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if hasattr(value, "__iter__") and not isinstance(value, str):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)
