"""Training checkpoints that survive crashes: atomic saving, integrity checks, and choosing what to resume.

Framework-neutral: detectron2's ``Checkpointer`` and mmengine's ``CheckpointHook`` / ``Runner.resume``
call these. Both frameworks save with ``torch.save`` in its zip format, whose central directory is
written last: a file cut short by a crash, a kill or a full disk has none, so opening it as a zip
archive tells an intact checkpoint from a truncated one without unpickling gigabytes.
"""

import errno
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

import torch

from ..utils.atomic import DiskFullError, atomic_path

__all__ = [
    "atomic_torch_save",
    "checkpoint_problem",
    "is_intact_checkpoint",
    "checkpoint_candidates",
    "choose_resume_checkpoint",
    "DiskFullError",
]

logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
# the iteration / epoch number in a checkpoint's name: model_0000499.pth, iter_500.pth, epoch_3.pth
_NUMBER = re.compile(r"(\d+)(?=\.\w+$)")


def atomic_torch_save(obj, path: PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file renamed into place only when complete.

    A crash or a full disk leaves the previous file (if any) untouched; ENOSPC is a ``DiskFullError``
    that names the file.
    """
    path = Path(path)
    writer = None
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                writer = _WriteErrorRecorder(f)
                torch.save(obj, writer)
                f.flush()
                os.fsync(f.fileno())
    except DiskFullError:
        raise
    except RuntimeError as e:  # torch's zip writer reports a failed write as RuntimeError
        write_errno = getattr(getattr(writer, "error", None), "errno", None)
        if (
            write_errno == errno.ENOSPC
            or "No space left" in str(e)
            or getattr(e.__cause__, "errno", None) == errno.ENOSPC
        ):
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing the checkpoint {path} (folder {path.parent}); "
                "free space there and resume, the previous checkpoints are unchanged",
            ) from e
        raise


class _WriteErrorRecorder:
    """A file's ``write`` / ``flush`` that keeps the OSError it raised: torch's zip writer replaces it by
    a RuntimeError without the errno ("unexpected pos 704 vs 598" on a full disk)."""

    def __init__(self, file):
        self._file = file
        self.error: Optional[OSError] = None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self._file.flush()


def _deepspeed_checkpoint_problem(folder: Path) -> Optional[str]:
    """A DeepSpeed checkpoint is a folder: the model states of rank 0 and each rank's ZeRO shard."""
    files = sorted(folder.glob("*.pt"))
    if not any(f.name.endswith("model_states.pt") for f in files):
        return "the folder holds no DeepSpeed model states (*model_states.pt)"
    for f in files:
        problem = checkpoint_problem(f)
        if problem is not None:
            return f"{f.name}: {problem}"
    return None


def checkpoint_problem(path: PathLike) -> Optional[str]:
    """Why ``path`` cannot be resumed from (missing, empty, truncated, not a checkpoint), or None.
    A folder is a DeepSpeed checkpoint (every ``.pt`` in it checked)."""
    path = Path(path)
    if path.is_dir():
        return _deepspeed_checkpoint_problem(path)
    if not path.is_file():
        return "the file does not exist"
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        # legacy (non-zip) torch files have no directory to check: try unpickling the header
        try:
            torch.load(path, map_location="cpu", weights_only=False, mmap=False)
        except Exception as e:
            first_line = (str(e).strip().splitlines() or [""])[0][:120]
            return f"it is truncated or not a PyTorch checkpoint ({size} bytes; {type(e).__name__}: {first_line})"
        return None
    except OSError as e:
        return f"it cannot be read ({e})"
    if not any(name.endswith("data.pkl") for name in names):
        return "it is a zip archive but not a PyTorch checkpoint (no data.pkl)"
    return None


def is_intact_checkpoint(path: PathLike) -> bool:
    return checkpoint_problem(path) is None


def _number(path: Path) -> int:
    found = _NUMBER.search(path.name)
    return int(found.group(1)) if found else -1


def checkpoint_candidates(folder: PathLike, patterns: Iterable[str]) -> List[Path]:
    """Checkpoint files in ``folder`` matching ``patterns`` (globs), newest first.

    "Newest" is the larger iteration / epoch number in the name, then the later modification time;
    a final checkpoint (``model_final.pth``) counts as newer than any numbered one.
    """
    folder = Path(folder)
    # files, and DeepSpeed's checkpoint folders (named as the files would be: iter_4.pth/)
    # never the best-validation model (model_best.pth): weights only, for evaluation
    found = {
        p
        for pattern in patterns
        for p in folder.glob(pattern)
        if p.exists() and not p.name.startswith(".") and not p.stem.endswith("_best")
    }

    def order(p: Path):
        final = "final" in p.stem
        return (final, _number(p), p.stat().st_mtime)

    return sorted(found, key=order, reverse=True)


def choose_resume_checkpoint(
    pointed: Optional[PathLike], folder: PathLike, patterns: Iterable[str]
) -> Tuple[Optional[Path], List[str]]:
    """The checkpoint to resume from: ``pointed`` (the framework's ``last_checkpoint``) when intact,
    else the newest intact one in ``folder``.

    Returns:
        (path or None when there is no intact checkpoint, warnings naming each skipped file and why).
    """
    warnings = []
    if pointed is not None:
        pointed = Path(pointed)
        problem = checkpoint_problem(pointed)
        if problem is None:
            return pointed, warnings
        warnings.append(f"cannot resume from {pointed}: {problem}")
    for candidate in checkpoint_candidates(folder, patterns):
        if pointed is not None and candidate.resolve() == pointed.resolve():
            continue
        problem = checkpoint_problem(candidate)
        if problem is None:
            if warnings:
                warnings.append(f"resuming from the newest intact checkpoint instead: {candidate}")
            return candidate, warnings
        warnings.append(f"skipping {candidate}: {problem}")
    return None, warnings
