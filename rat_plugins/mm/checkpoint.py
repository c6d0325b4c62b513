"""Let mmengine 0.10.7 read its own checkpoints under torch >= 2.6 (weights-only ``torch.load``).

mmengine's checkpoints hold ``HistoryBuffer`` objects (numpy arrays, statistics methods pickled as
``getattr(HistoryBuffer, 'mean')``), which the weights-only unpickler refuses, so ``--resume``,
``load_from`` and ``tools/test.py`` fail (open-mmlab/mmengine#1655). Importing this module adds a
narrow allow-list instead of turning weights-only loading off.
"""

import pickle

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

__all__ = ["MMENGINE_CHECKPOINT_GLOBALS", "history_buffer_getattr"]


_STATISTICS = frozenset({"min", "max", "current", "mean"})  # HistoryBuffer's defaults


def history_buffer_getattr(obj, name):
    """``getattr`` for unpickling, limited to ``HistoryBuffer.<statistics method>``."""
    allowed = _STATISTICS | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and name in allowed and callable(getattr(obj, name, None)):
        return getattr(obj, name)
    raise pickle.UnpicklingError(f"weights-only checkpoint loading refuses getattr({obj!r}, {name!r})")


def _numpy_globals():
    core = getattr(np, "_core", None) or np.core
    reconstruct, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    out = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for prefix in ("numpy._core", "numpy.core"):  # checkpoints written under numpy 2 and numpy 1
        out += [(reconstruct, f"{prefix}.multiarray._reconstruct"), (scalar, f"{prefix}.multiarray.scalar")]
    for t in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    ):
        cls = type(np.dtype(t))
        out.append((cls, f"{cls.__module__}.{cls.__qualname__}"))
    return out


MMENGINE_CHECKPOINT_GLOBALS = [HistoryBuffer, (history_buffer_getattr, "builtins.getattr"), *_numpy_globals()]

torch.serialization.add_safe_globals(MMENGINE_CHECKPOINT_GLOBALS)
