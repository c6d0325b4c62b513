"""Dataset subsets for fast iteration: a fixed, seeded fraction of a training split.

The sample depends only on the split's size, the fraction and its own seed (not on the run's seed),
so every run of a sweep trains on the same images.
"""

import math
import random
from typing import List

from ..utils.config_keys import ConfigError

__all__ = ["FRACTION_SEED", "fraction_count", "fraction_indices"]

FRACTION_SEED = 0


def fraction_count(total: int, fraction: float) -> int:
    """How many of ``total`` items a ``fraction`` keeps (at least one)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"dataset_fraction must be a number in (0, 1], got {fraction!r} (e.g. 0.1 for 10 %)")
    return max(1, math.ceil(total * fraction - 1e-9))


def fraction_indices(total: int, fraction: float, seed: int = FRACTION_SEED) -> List[int]:
    """The indices of the items kept, in their original order."""
    keep = fraction_count(total, fraction)
    if keep >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), keep))
