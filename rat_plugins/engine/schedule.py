"""Epoch-based schedules expressed in iterations (what detectron2's iteration-based trainer needs)."""

import math
from dataclasses import dataclass

__all__ = ["EpochSchedule", "epoch_schedule", "MAX_CHECKPOINT_PERIOD"]

# A kill (preemption, OOM killer, power) loses the iterations since the last checkpoint: at most this
# many (a few minutes of training), however long an epoch of a large training split is.
MAX_CHECKPOINT_PERIOD = 500


@dataclass(frozen=True)
class EpochSchedule:
    iters_per_epoch: int
    max_iter: int
    warmup_iters: int
    milestones: tuple  # iterations at which the learning rate is multiplied by 0.1
    checkpoint_period: int = 0  # iterations between checkpoints: once an epoch, at most MAX_CHECKPOINT_PERIOD

    @property
    def lr_factors(self) -> tuple:
        """Learning-rate multipliers before the first milestone and after each (1, 0.1, ...)."""
        return tuple(0.1**i for i in range(len(self.milestones) + 1))

    @property
    def warmup_fraction(self) -> float:
        return min(1.0, self.warmup_iters / self.max_iter)


def epoch_schedule(
    num_images: int,
    batch_size: int,
    epochs: int,
    warmup_iters: int = 500,
    decay_at=(0.7, 0.9),
    max_checkpoint_period: int = MAX_CHECKPOINT_PERIOD,
) -> EpochSchedule:
    """iterations = ceil(num_images / batch_size) * epochs; multistep decay at fractions of it.

    Args:
        num_images: images in the training split (every image counts, as in the OFAT study's epochs).
        batch_size: the effective (total) batch, whatever the micro-batch.
        epochs: number of passes over the training split.
        warmup_iters: linear warm-up length, capped at the schedule length.
        decay_at: fractions of ``max_iter`` where the learning rate drops by 10x.
        max_checkpoint_period: checkpoints come once an epoch, or every this many iterations when an
            epoch is longer.
    """
    if num_images <= 0:
        raise ValueError(f"the training split has {num_images} images; cannot build an epoch schedule")
    if batch_size <= 0 or epochs <= 0:
        raise ValueError(f"batch_size ({batch_size}) and epochs ({epochs}) must be positive")
    iters_per_epoch = math.ceil(num_images / batch_size)
    max_iter = iters_per_epoch * epochs
    # fvcore wants strictly increasing milestones in (0, max_iter): clamp for short runs, and drop
    # the decays a run of a few iterations has no room for
    milestones = [min(int(round(f * max_iter)), max_iter - 1) for f in decay_at]
    for i in range(len(milestones) - 2, -1, -1):
        milestones[i] = min(milestones[i], milestones[i + 1] - 1)
    milestones = tuple(m for m in milestones if m > 0)
    checkpoint_period = max(1, min(iters_per_epoch, max_checkpoint_period))
    return EpochSchedule(iters_per_epoch, max_iter, min(warmup_iters, max_iter), milestones, checkpoint_period)
