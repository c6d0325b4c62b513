"""mmengine checkpoints: read under weights-only loading, written atomically, checked against the model,
and chosen for resuming.

mmengine 0.10.7 cannot read its own checkpoints under torch >= 2.6 (weights-only ``torch.load``):
mmengine's checkpoints hold ``HistoryBuffer`` objects (numpy arrays, statistics methods pickled as
``getattr(HistoryBuffer, 'mean')``), which the weights-only unpickler refuses, so ``--resume``,
``load_from`` and ``tools/test.py`` fail (open-mmlab/mmengine#1655). Importing this module adds a
narrow allow-list instead of turning weights-only loading off.
"""

import pickle
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from mmengine.fileio import LocalBackend, register_backend
from mmengine.logging import HistoryBuffer

from ..engine.checkpoints import choose_resume_checkpoint
from ..utils.atomic import atomic_write_bytes

__all__ = [
    "MMENGINE_CHECKPOINT_GLOBALS",
    "history_buffer_getattr",
    "AtomicLocalBackend",
    "state_dict_mismatches",
    "describe_mismatches",
    "RESUME_PATTERNS",
    "read_last_checkpoint",
    "choose_mm_resume_checkpoint",
]


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


# ----------------------------------------------------------------------------- writing: atomic local files


@register_backend("local_atomic")
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose ``put`` / ``put_text`` write a temporary file and rename it.

    Checkpoints are written through a file backend's ``put`` (``mmengine.runner.save_checkpoint``), so
    naming this backend in the checkpoint hook's ``backend_args`` makes every checkpoint save atomic
    with no change to the Runner: a crash, a kill or a full disk leaves the previous file (if any)
    whole and no half-written one; ENOSPC is a ``DiskFullError`` naming the file.
    """

    def put(self, obj: bytes, filepath) -> None:
        atomic_write_bytes(filepath, obj)

    def put_text(self, obj: str, filepath, encoding: str = "utf-8") -> None:
        atomic_write_bytes(filepath, obj.encode(encoding))


# ----------------------------------------------------------------------------- reading: does it fit the model


def state_dict_mismatches(
    model_state: Mapping[str, torch.Tensor], checkpoint_state: Mapping[str, object]
) -> Tuple[List[str], List[str], List[str]]:
    """(missing keys, unexpected keys, 'key: checkpoint AxB, model CxD' for shape mismatches).

    BatchNorm's ``num_batches_tracked`` may be missing, as mmengine allows.
    """
    missing = [k for k in model_state if k not in checkpoint_state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in checkpoint_state if k not in model_state]
    wrong_shape = []
    for key, value in checkpoint_state.items():
        if key in model_state and hasattr(value, "shape") and tuple(value.shape) != tuple(model_state[key].shape):
            wrong_shape.append(f"{key}: checkpoint {_shape(value)}, model {_shape(model_state[key])}")
    return missing, unexpected, wrong_shape


def _shape(tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def describe_mismatches(missing: Sequence[str], unexpected: Sequence[str], wrong_shape: Sequence[str], n=3) -> str:
    """``'2 missing keys (a, b), 1 key with another shape (c: checkpoint 64, model 96)'``; '' if none."""
    parts = []
    for items, what in (
        (missing, "missing key"),
        (unexpected, "unexpected key"),
        (wrong_shape, "key with another shape"),
    ):
        if items:
            shown = "; ".join(items[:n]) + ("; ..." if len(items) > n else "")
            plural = what.replace("key", "keys") if len(items) > 1 else what
            parts.append(f"{len(items)} {plural} ({shown})")
    return ", ".join(parts)


# ----------------------------------------------------------------------------- resuming: which checkpoint

RESUME_PATTERNS = ("iter_*.pth", "epoch_*.pth")  # CheckpointHook's default names; best_*.pth lack the optimizer


def read_last_checkpoint(work_dir) -> Tuple[Optional[str], List[str]]:
    """The path ``<work_dir>/last_checkpoint`` names (mmengine's pointer), and warnings about the pointer itself."""
    pointer = Path(work_dir) / "last_checkpoint"
    try:
        text = pointer.read_text().strip()
    except FileNotFoundError:
        return None, []
    except (OSError, UnicodeDecodeError) as e:
        return None, [f"cannot read {pointer} ({e})"]
    if not text:
        return None, [f"{pointer} is empty (a save was interrupted)"]
    return text, []


def choose_mm_resume_checkpoint(
    work_dir, checkpoint_dir=None, patterns: Iterable[str] = RESUME_PATTERNS
) -> Tuple[Optional[Path], List[str]]:
    """What ``--resume`` continues from: the checkpoint ``last_checkpoint`` points at when it is intact,
    else the newest intact ``iter_*.pth`` / ``epoch_*.pth`` in the checkpoint folder, else None.

    Returns (path or None, warnings naming every skipped file and why).
    """
    folder = Path(checkpoint_dir or work_dir)
    pointed, warnings = read_last_checkpoint(work_dir)
    if pointed is not None and Path(pointed).resolve().parent != folder.resolve():
        # mmengine writes the path as the run saw it: a moved or copied work dir still names the old place
        local = folder / Path(pointed).name
        warnings.append(f"{Path(work_dir) / 'last_checkpoint'} names {pointed}, outside {folder}: using {local}")
        pointed = str(local)
    chosen, more = choose_resume_checkpoint(pointed, folder, patterns)
    return chosen, warnings + more
