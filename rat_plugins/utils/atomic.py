"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``.

Readers see the old file or the whole new one, never half of it; an interrupted or failed write
(an exception, a full disk) removes its temporary file and leaves the previous file untouched.
"""

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "DiskFullError"]

PathLike = Union[str, os.PathLike]


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the file and its folder."""


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) that becomes ``path`` on success.

    For libraries that write files themselves (``torch.save``, ``PIL.Image.save``,
    ``matplotlib.savefig``, ``h5py``): they write the temporary path, and only a complete file is
    renamed into place. The target's folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    # mkstemp makes the file 0600; give it the mode a plain open() would (or the old file's)
    os.chmod(tmp, _target_mode(path))
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if e.errno == errno.ENOSPC and not isinstance(e, DiskFullError):
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing {path} (folder {path.parent}); "
                "free space there and run again, the previous file is unchanged",
            ) from e
        raise
    except BaseException:
        _remove(tmp)
        raise


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _remove(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2, **dump_kwargs) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **dump_kwargs) + "\n")
