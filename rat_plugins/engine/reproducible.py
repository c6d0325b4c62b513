"""Runs that continue after a resume exactly as if they had never stopped.

Two things make a resumed run drift from an uninterrupted one even when the weights, the optimizer
and the schedule are restored: the data order starts again (a fresh sampler), and the random
streams (augmentations, dropout, box sampling, drop path) continue from the seed, not from where
the first run left them. Both are removed the same way in both tool families:

- before each training batch is fetched, the random number generators of the process (python,
  numpy, torch, every CUDA device) are reset from ``(seed, rank, batch number)``
  (:func:`reseed_for_batch`); so what a batch does depends on its number, not on the run's history;
- on resume the data loader is replayed up to where the run stopped (the done batches are loaded
  again, each after its own reseed, and dropped: the sampler, the aspect-ratio buckets and the
  loader workers' own random states come back as they were). This is what mmengine's
  ``IterBasedTrainLoop`` already does; it costs the data time of the done iterations, not their
  compute.

Exact equality also needs the same world size and deterministic kernels (the CPU path is).
"""

import logging
import random
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

__all__ = ["reseed_for_batch", "ReplayableBatches", "preserved_random_state"]

logger = logging.getLogger(__name__)


def reseed_for_batch(seed: int, rank: int, batch: int) -> None:
    """Reset python's, numpy's and torch's (CPU and CUDA) generators from ``(seed, rank, batch)``."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank), int(batch)]).generate_state(2)
    random.seed(int(words[0]))
    np.random.seed(int(words[0]))
    torch.manual_seed((int(words[0]) << 32) | int(words[1]))  # all CUDA devices too


@contextmanager
def preserved_random_state():
    """Python's, numpy's and torch's (CPU and CUDA) generators as they were, on exit: for work before training
    that must not shift the run's random streams (the auto-batch probe, which a resumed run skips)."""
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


class ReplayableBatches:
    """The batches of an endless training loader, each fetched after :func:`reseed_for_batch`.

    ``skip`` (set before iterating; a resumed run's done batches) are fetched the same way and
    dropped, so batch ``skip`` is the one the uninterrupted run had there.

    Args:
        loader: an iterable of batches (detectron2's training loader never ends).
        seed: the run's seed; None or negative (a new seed per run): the loader's batches as they come,
            and a resumed run continues with new data order and random streams.
        rank: this process's rank (each rank its own streams).
    """

    def __init__(self, loader: Iterable, seed: Optional[int], rank: int):
        self.loader = loader
        self.seed = None if seed is None or int(seed) < 0 else int(seed)
        self.rank = int(rank)
        self.skip = 0

    def __iter__(self) -> Iterator:
        if self.seed is None:
            yield from self.loader
            return
        # the loader workers' seeds are drawn from this process's generator when the iterator starts
        reseed_for_batch(self.seed, self.rank, 0)
        batches = iter(self.loader)
        if self.skip:
            logger.info(
                "resume: replaying the data of the %d batches already trained, so that the run continues "
                "as if uninterrupted",
                self.skip,
            )
            started = time.perf_counter()
            for number in range(self.skip):
                reseed_for_batch(self.seed, self.rank, number)
                next(batches)
            logger.info("resume: data replayed in %.1f s", time.perf_counter() - started)
        number = self.skip
        while True:
            reseed_for_batch(self.seed, self.rank, number)
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield batch
            number += 1
