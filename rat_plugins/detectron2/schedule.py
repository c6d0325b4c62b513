"""Config helper: an epoch-based schedule written into a LazyConfig's ``train``/``lr_multiplier``."""
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ..engine.schedule import epoch_schedule
from .data import num_images

__all__ = ["set_epoch_schedule", "multistep_with_warmup"]


def multistep_with_warmup():
    """LazyCall of a warm-up + x0.1 multistep scheduler; ``set_epoch_schedule`` fills the numbers."""
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[0, 0], num_updates=1),
        warmup_length=0.0,
        warmup_factor=0.001,
    )


def set_epoch_schedule(train, lr_multiplier, dataloader, epochs: int, dataset: str = "heads_train",
                       warmup_iters: int = 500) -> None:
    """Fill max_iter, warm-up, decay milestones, eval and checkpoint periods from epochs.

    iterations = ceil(images in ``dataset`` / ``dataloader.train.total_batch_size``) x epochs; the
    learning rate drops x0.1 at 70 % and 90 %; evaluation and checkpoints every epoch. The inputs
    are kept in ``train.epochs`` / ``train.num_train_images`` so that the project's training tool
    recomputes everything after command-line overrides of the batch or the epochs.
    """
    train.epochs = epochs
    train.num_train_images = num_images(dataset)
    train.warmup_iters = warmup_iters
    sched = epoch_schedule(train.num_train_images, dataloader.train.total_batch_size, epochs, warmup_iters)
    train.max_iter = sched.max_iter
    train.eval_period = sched.iters_per_epoch
    train.checkpointer.period = sched.iters_per_epoch
    lr_multiplier.scheduler.milestones = list(sched.milestones)
    lr_multiplier.scheduler.values = list(sched.lr_factors)
    lr_multiplier.scheduler.num_updates = sched.max_iter
    lr_multiplier.warmup_length = sched.warmup_fraction
