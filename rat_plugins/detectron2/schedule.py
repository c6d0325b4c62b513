"""Epoch-based schedules written into a LazyConfig's ``train`` / ``lr_multiplier``."""

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ..engine.schedule import epoch_schedule

__all__ = ["set_epoch_schedule", "multistep_with_warmup"]


def multistep_with_warmup():
    """LazyCall of a warm-up + x0.1 multistep scheduler; ``set_epoch_schedule`` fills the numbers."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[0, 0], num_updates=1),
        warmup_length=0.0,
        warmup_factor=0.001,
    )


def set_epoch_schedule(train, lr_multiplier, dataloader, epochs=None, num_images=None, warmup_iters=None) -> None:
    """Fill max_iter, warm-up, decay milestones, eval and checkpoint periods from epochs.

    iterations = ceil(``num_images`` / ``dataloader.train.total_batch_size``) x ``epochs``; the
    learning rate drops x0.1 at 70 % and 90 %; evaluation and checkpoints every epoch. The inputs
    are kept in ``train.epochs`` / ``train.num_train_images`` / ``train.warmup_iters``; arguments
    left as None keep the values stored there, so the project's training tool can recompute
    everything after command-line overrides of the batch or the epochs.

    Args:
        train: the config's ``train`` node.
        lr_multiplier: a :func:`multistep_with_warmup` node, or None to leave the learning rate alone.
        dataloader: the config's ``dataloader`` node (its ``train.total_batch_size`` is the batch).
    """
    if epochs is not None:
        train.epochs = epochs
    if num_images is not None:
        train.num_train_images = num_images
    train.warmup_iters = warmup_iters if warmup_iters is not None else train.get("warmup_iters", 500)
    sched = epoch_schedule(train.num_train_images, dataloader.train.total_batch_size, train.epochs, train.warmup_iters)
    train.max_iter = sched.max_iter
    train.eval_period = sched.iters_per_epoch
    train.checkpointer.period = sched.iters_per_epoch
    if lr_multiplier is not None and "scheduler" in lr_multiplier:
        lr_multiplier.scheduler.milestones = list(sched.milestones)
        lr_multiplier.scheduler.values = list(sched.lr_factors)
        lr_multiplier.scheduler.num_updates = sched.max_iter
        lr_multiplier.warmup_length = sched.warmup_fraction
