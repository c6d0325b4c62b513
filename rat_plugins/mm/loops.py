"""mmengine training loops whose resumed runs continue exactly as uninterrupted ones would.

``tools/train.py`` runs a config's ``IterBasedTrainLoop`` / ``EpochBasedTrainLoop`` as these
subclasses (same arguments; configs run by OpenMMLab's own tools can name them too). Both reset the
random generators before each batch is fetched, from ``(seed, rank, iteration)``
(:func:`~rat_plugins.engine.reproducible.reseed_for_batch`), so that what iteration ``i`` does does
not depend on whether the run stopped before it:

- :class:`ReproducibleIterBasedTrainLoop`: mmengine already replays the data loader up to the
  resumed iteration; the reseed makes the replayed and the following batches those of the
  uninterrupted run (with ``num_workers=0`` the transforms draw from this process's generators).
- :class:`ReproducibleEpochBasedTrainLoop`: a checkpoint saved mid-epoch (a stop signal) resumes in
  that epoch after its last trained batch (mmengine's loop would start the epoch again and train
  its first batches twice): the epoch's done batches are loaded again and dropped.
"""

import itertools
from typing import Iterator

from mmengine.dist import get_rank
from mmengine.registry import LOOPS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

from ..engine.reproducible import reseed_for_batch

__all__ = ["ReproducibleIterBasedTrainLoop", "ReproducibleEpochBasedTrainLoop", "reproducible_loop_type"]


class _ReseededIterator:
    """The loop's endless batch iterator, each ``next`` preceded by the batch's reseed."""

    def __init__(self, iterator, seed: int, rank: int):
        self.iterator, self.seed, self.rank = iterator, seed, rank
        self.fetched = 0  # batches fetched: the replay after a resume counts from 0 as the first run did

    def __iter__(self):
        return self

    def __next__(self):
        reseed_for_batch(self.seed, self.rank, self.fetched)
        self.fetched += 1
        return next(self.iterator)


def _run_seed(runner):
    """The runner's seed (mmengine draws and shares one when the config gives none)."""
    return getattr(runner, "seed", None)


@LOOPS.register_module()
class ReproducibleIterBasedTrainLoop(IterBasedTrainLoop):
    """``IterBasedTrainLoop`` (same arguments) reseeding before each batch: see the module's docstring."""

    def __init__(self, runner, dataloader, *args, **kwargs):
        super().__init__(runner, dataloader, *args, **kwargs)
        seed = _run_seed(runner)
        if seed is not None:
            self.dataloader_iterator = _ReseededIterator(self.dataloader_iterator, seed, get_rank())


@LOOPS.register_module()
class ReproducibleEpochBasedTrainLoop(EpochBasedTrainLoop):
    """``EpochBasedTrainLoop`` (same arguments) reseeding before each batch and resuming mid-epoch after the
    last trained batch: see the module's docstring."""

    def _batches(self, done: int) -> Iterator:
        """This epoch's batches after the first ``done`` (loaded again and dropped), each fetched after its reseed."""
        seed, rank, first = _run_seed(self.runner), get_rank(), self._epoch * len(self.dataloader)
        reseed = (lambda number: None) if seed is None else (lambda number: reseed_for_batch(seed, rank, number))
        reseed(first)  # the loader workers' seeds are drawn when the iterator starts
        batches = iter(self.dataloader)
        for number in itertools.count(first):
            reseed(number)
            try:
                batch = next(batches)
            except StopIteration:
                return
            if number >= first + done:
                yield batch

    def run_epoch(self) -> None:
        done = max(0, self._iter - self._epoch * len(self.dataloader))  # > 0 in an epoch a stop signal interrupted
        self.runner.call_hook("before_train_epoch")
        self.runner.model.train()
        for idx, data_batch in enumerate(self._batches(done), start=done):
            self.run_iter(idx, data_batch)
        self.runner.call_hook("after_train_epoch")
        self._epoch += 1


_REPRODUCIBLE = {
    "IterBasedTrainLoop": "ReproducibleIterBasedTrainLoop",
    "EpochBasedTrainLoop": "ReproducibleEpochBasedTrainLoop",
}


def reproducible_loop_type(train_cfg: dict) -> dict:
    """``train_cfg`` with mmengine's loop replaced by its reproducible subclass (a ``by_epoch`` config too)."""
    train_cfg = dict(train_cfg)
    loop = train_cfg.get("type")
    if loop is None:  # mmengine's shorthand: by_epoch=True / False
        by_epoch = train_cfg.pop("by_epoch", None)
        if by_epoch is None:
            return train_cfg
        loop = "EpochBasedTrainLoop" if by_epoch else "IterBasedTrainLoop"
    name = loop.split(".", 1)[-1] if isinstance(loop, str) else None
    if name in _REPRODUCIBLE:
        train_cfg["type"] = _REPRODUCIBLE[name]
    return train_cfg
