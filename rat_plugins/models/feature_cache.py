"""Disk cache for the outputs of a frozen backbone, one file per input image.

A frozen backbone maps the same input to the same features in every iteration, epoch and sweep
run, so on CPU recomputing them is most of a training step. An entry is keyed by the module's
fingerprint and by a hash of the exact input tensor (which encodes the image, its resize, flip and
normalisation). The fingerprint covers the class, configuration, every state-dict tensor, the
method computing the features, the torch version and the code that computes them
(:func:`code_fingerprint`: the source files of the module's classes, of the project modules they
use, and of the C++ kernels beside those), so an edit of the ViM forward or of the scan kernel
never serves stale features. Features are stored as float16 where they fit, float32 otherwise;
fresh features go through the same rounding, so a hit and a miss return the same values.

Reliability: an unreadable, truncated or vanished entry is recomputed; a write that fails (disk
full, read-only folder) leaves the run going without caching that entry; the whole cache root is
kept under a size cap (``max_gb`` or ``$RAT_FEATURE_CACHE_MAX_GB``, default 4 GB) by deleting the
least recently used entries, which several processes sharing the folder may do at once.
"""

import errno
import functools
import hashlib
import importlib.metadata
import io
import logging
import math
import os
import sys
import time
import types
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..utils.atomic import atomic_path
from ..utils.config_keys import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "FrozenFeatureCache",
    "CachedFrozenForward",
    "module_fingerprint",
    "code_fingerprint",
    "code_files",
    "MAX_GB_ENV",
    "DEFAULT_MAX_GB",
]

_FLOAT16_MAX = 65504.0
MAX_GB_ENV = "RAT_FEATURE_CACHE_MAX_GB"
DEFAULT_MAX_GB = 4.0
# eviction goes below the cap by this fraction, so that it does not run again at the next write
_EVICT_TO = 0.9
# a process re-reads the folder's size after writing this fraction of the cap (others write too)
_RESCAN_EVERY = 0.1
# temporary files older than this are left by a killed writer: eviction removes them
_STALE_TMP_S = 3600.0
_PACKAGE = __name__.split(".")[0]
_KERNEL_SUFFIXES = (".cpp", ".cc", ".cu", ".cuh", ".h", ".hpp")


def _tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


# -- the code that computes the features ------------------------------------------------------------


def _module_file(module: types.ModuleType) -> Optional[Path]:
    path = getattr(module, "__file__", None)
    return Path(path).resolve() if path and path.endswith(".py") and os.path.isabs(path) else None


def _referenced_modules(module: types.ModuleType) -> List[types.ModuleType]:
    """rat_plugins modules that ``module`` imported, or whose functions / classes it imported."""
    found = []
    for value in list(vars(module).values()):
        if isinstance(value, types.ModuleType):
            name = value.__name__
        else:
            name = getattr(value, "__module__", None) if callable(value) else None
        if isinstance(name, str) and name.split(".")[0] == _PACKAGE and name in sys.modules:
            found.append(sys.modules[name])
    return found


def _class_module(cls: type) -> Optional[types.ModuleType]:
    """The module that defined ``cls``: the one in ``sys.modules`` unless it was re-imported from
    another file since (then the module of the class's own methods)."""
    module = sys.modules.get(cls.__module__)
    if module is not None and getattr(module, cls.__name__, None) is cls:
        return module
    for value in vars(cls).values():
        namespace = getattr(value, "__globals__", None)
        if namespace is not None and namespace.get("__name__") == cls.__module__:
            stand_in = types.ModuleType(cls.__module__)
            stand_in.__file__ = namespace.get("__file__")
            return stand_in
    return module


@functools.cache
def _closure_files(module_name: str, file: Optional[str]) -> Tuple[Path, ...]:
    """Source files behind the module ``module_name`` loaded from ``file``: its own and the C++ /
    CUDA sources in ``csrc/`` beside it; for a rat_plugins module also those of the rat_plugins
    modules it uses, transitively (other packages count by their class files and, for torch, its
    version)."""
    loaded = sys.modules.get(module_name)
    if loaded is None or getattr(loaded, "__file__", None) != file:
        loaded = types.ModuleType(module_name)
        loaded.__file__ = file
    seen, todo, files = set(), [loaded], set()
    while todo:
        module = todo.pop()
        if module.__name__ in seen:
            continue
        seen.add(module.__name__)
        path = _module_file(module)
        if path is None:
            continue
        files.add(path)
        kernels = path.parent / "csrc"
        if kernels.is_dir():
            files.update(p.resolve() for p in kernels.rglob("*") if p.suffix in _KERNEL_SUFFIXES)
        if module.__name__.split(".")[0] == _PACKAGE:
            todo.extend(_referenced_modules(module))
    return tuple(sorted(files))


def code_files(module: nn.Module) -> Tuple[Path, ...]:
    """Every source file :func:`code_fingerprint` hashes for ``module``: the files of the classes of
    ``module`` and of its submodules (with their base classes up to ``nn.Module``), and what
    :func:`_closure_files` adds for each."""
    sources = set()
    for sub in module.modules():
        for cls in type(sub).__mro__:
            if cls is nn.Module or cls is object:
                break
            defined_in = _class_module(cls)
            sources.add((cls.__module__, getattr(defined_in, "__file__", None)))
    files = set()
    for name, file in sorted(sources, key=str):
        files.update(_closure_files(name, file))
    return tuple(sorted(files))


@functools.cache
def _file_digest(path: Path) -> str:
    try:
        return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    except OSError as e:  # a file that vanished since import: its name still counts
        logger.debug("feature cache: cannot read %s for the code fingerprint (%s)", path, e)
        return "unreadable"


@functools.cache
def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def code_fingerprint(module: nn.Module) -> str:
    """Hash of the code computing ``module``'s output: the sources of :func:`code_files`, the torch
    version and whether mamba-ssm's CUDA scan is installed (and which). Each file is read once per
    process: the code a process runs does not change under it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"torch={torch.__version__}|mamba_ssm={_distribution_version('mamba_ssm')}|".encode())
    for path in code_files(module):
        h.update(f"{path.name}={_file_digest(path)}|".encode())
    return h.hexdigest()


def _clear_code_cache() -> None:
    """Forget the files read so far (for tests that edit a module's source)."""
    _closure_files.cache_clear()
    _file_digest.cache_clear()


def module_fingerprint(module: nn.Module, config_attrs: Iterable[str] = (), method: str = "forward") -> str:
    """Hash of what determines a frozen module's output apart from its input (``method``: what
    computes it, e.g. ``forward_features``)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(module).__module__}.{type(module).__qualname__}|code={code_fingerprint(module)}|".encode())
    if method != "forward":
        h.update(f"method={method}|".encode())
    for sub in module.modules():  # configuration that lives outside the weights
        h.update(f"{type(sub).__name__}({sub.extra_repr()})|".encode())
    for name in config_attrs:
        h.update(f"{name}={getattr(module, name)!r}|".encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        _tensor_digest(h, tensor)
    return h.hexdigest()


# -- storage ------------------------------------------------------------------------------------------


def _compact(features: torch.Tensor) -> torch.Tensor:
    """float32 features as float16 where every value fits; anything else unchanged."""
    if features.dtype != torch.float32 or features.numel() == 0:
        return features
    if bool(torch.isfinite(features).all()) and float(features.abs().max()) < _FLOAT16_MAX:
        return features.to(torch.float16)
    return features


def _expand(features: torch.Tensor) -> torch.Tensor:
    return features.float() if features.dtype == torch.float16 else features


def _check_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f'feature cache folder {path} is a file; set feature_cache_dir to a folder (or to "" to turn the cache off)'
        )


def _max_bytes(max_gb: Optional[float]) -> float:
    """The cap in bytes: ``max_gb``, else ``$RAT_FEATURE_CACHE_MAX_GB``, else the default."""
    source = "max_gb"
    if max_gb is None:
        raw = os.environ.get(MAX_GB_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_GB * 2**30
        source = f"${MAX_GB_ENV}"
        try:
            max_gb = float(raw)
        except ValueError:
            raise ConfigError(
                f"{source}={raw!r} is not a number of gigabytes; set it to a positive number "
                f"such as {DEFAULT_MAX_GB:g} ('inf' for no cap) or unset it"
            ) from None
    if math.isnan(max_gb) or max_gb <= 0:
        raise ConfigError(
            f"feature cache size cap {source}={max_gb!r} must be a positive number of gigabytes "
            f"(e.g. {DEFAULT_MAX_GB:g}; 'inf' for no cap)"
        )
    return max_gb * 2**30


class FrozenFeatureCache:
    """Per-image feature files under ``cache_root/<module fingerprint>/``, written atomically.

    Args:
        cache_root: the folder shared by every module's entries; the size cap applies to all of it.
        fingerprint: the module's :func:`module_fingerprint`.
        max_gb: size cap of ``cache_root`` in GB (default ``$RAT_FEATURE_CACHE_MAX_GB``, else 4);
            the least recently used entries are deleted when a write takes it over the cap.
    """

    def __init__(self, cache_root: Union[str, os.PathLike], fingerprint: str, max_gb: Optional[float] = None):
        self.cache_root = Path(cache_root).expanduser()
        _check_folder(self.cache_root)
        self.root = self.cache_root / fingerprint
        self.max_bytes = _max_bytes(max_gb)
        self.hits = 0
        self.misses = 0
        self.failed_writes = 0
        self.evicted = 0
        self._known_bytes: Optional[int] = None  # size of cache_root at the last scan + own writes since
        self._written_since_scan = 0

    @staticmethod
    def input_key(x: torch.Tensor) -> str:
        h = hashlib.blake2b(digest_size=20)
        _tensor_digest(h, x)
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def load(self, key: str) -> Optional[dict]:
        """``{"outputs": [per-output tensors of one image], "sequence": bool, "names": [...] or None}``
        or None (not cached, or unusable: it is then recomputed and replaced)."""
        path = self._path(key)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:  # not cached yet, or evicted by another process meanwhile
            return None
        except Exception as e:  # a truncated, empty or foreign file
            logger.warning("feature cache entry %s is unreadable (%s: %s); recomputing it", path, type(e).__name__, e)
            return None
        outputs = entry.get("outputs") if isinstance(entry, dict) else None
        if not (isinstance(outputs, list) and outputs and all(torch.is_tensor(t) for t in outputs)):
            logger.warning("feature cache entry %s is not a feature cache entry; recomputing it", path)
            return None
        try:  # its modification time records the last use, for least-recently-used eviction
            os.utime(path)
        except OSError as e:
            logger.debug("feature cache: cannot mark %s as used (%s)", path, e)
        return entry

    def save(self, key: str, entry: dict) -> bool:
        """Write one entry; False (with a warning) when it cannot be written: the run goes on."""
        path = self._path(key)
        # serialized in memory first: torch.save writing a file itself reports a full disk as a
        # RuntimeError (its zip writer's own error hides the OSError and its errno)
        buffer = io.BytesIO()
        torch.save(
            {
                "outputs": [t.cpu().clone() for t in entry["outputs"]],
                "sequence": entry["sequence"],
                "names": entry.get("names"),
            },
            buffer,
        )
        try:
            # readers see the old file or the whole new one; no fsync: an entry lost to a power cut
            # reads as truncated and is recomputed
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
        except OSError as e:  # disk full, read-only or vanished folder, quota
            self._write_failed(path, e)
            return False
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # evicted by another process already
            return True
        self._account(size)
        return True

    def _write_failed(self, path: Path, error: OSError) -> None:
        self.failed_writes += 1
        disk_full = isinstance(error, OSError) and error.errno == errno.ENOSPC
        if disk_full:
            why = f"disk full in {self.cache_root}; free space there or lower ${MAX_GB_ENV}"
        else:
            why = f"{type(error).__name__}: {error}"
        # the first failure is a warning; the rest would repeat it once per image
        log = logger.warning if self.failed_writes == 1 else logger.debug
        log(
            "feature cache: could not write %s (%s); continuing without caching it%s",
            path,
            why,
            " (further failures are logged at debug level)" if self.failed_writes == 1 else "",
        )
        if disk_full:
            self._known_bytes = None  # re-read the folder at the next write: others may have filled it

    # -- size cap ---------------------------------------------------------------------------------

    def _entries(self) -> List[Tuple[float, int, str]]:
        """``(last use, size, path)`` of every file under ``cache_root``; stale temporary files
        (left by a killed writer) are deleted. Files another process deletes meanwhile are skipped."""
        found = []
        now = time.time()
        for fingerprint in _scandir(self.cache_root):
            if not fingerprint.is_dir(follow_symlinks=False):
                continue
            for bucket in _scandir(fingerprint.path):
                if not bucket.is_dir(follow_symlinks=False):
                    continue
                for item in _scandir(bucket.path):
                    try:
                        st = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if item.name.startswith(".") and ".tmp" in item.name:
                        if now - st.st_mtime > _STALE_TMP_S:
                            _unlink(item.path)
                            continue
                    elif not item.name.endswith(".pt"):
                        continue
                    found.append((st.st_mtime, st.st_size, item.path))
        return found

    def _account(self, size: int) -> None:
        if self._known_bytes is None or self._written_since_scan >= _RESCAN_EVERY * self.max_bytes:
            self._known_bytes = sum(s for _, s, _ in self._entries())
            self._written_since_scan = 0
        else:
            self._known_bytes += size
            self._written_since_scan += size
        if self._known_bytes > self.max_bytes:
            self.evict()

    def evict(self) -> int:
        """Delete least recently used entries until the cache root is below the cap (with some
        room); returns the bytes freed. Safe while other processes read, write and evict."""
        entries = sorted(self._entries())
        total = sum(size for _, size, _ in entries)
        target = _EVICT_TO * self.max_bytes
        freed = removed = 0
        for _, size, path in entries:
            if total - freed <= target:
                break
            if _unlink(path):
                removed += 1
            freed += size  # gone either way: this process or another deleted it
        self._known_bytes = total - freed
        self._written_since_scan = 0
        if removed:
            self.evicted += removed
            logger.info(
                "feature cache: removed %d least recently used entries (%.1f MB) from %s to stay under %.2f GB",
                removed,
                freed / 2**20,
                self.cache_root,
                self.max_bytes / 2**30,
            )
        return freed


def _scandir(path) -> List[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


class CachedFrozenForward:
    """Calls ``module`` only on the images of a batch whose features are not cached yet.

    ``module`` must be frozen (no trainable parameter) and treat the images of a batch
    independently, which holds for a ViM/ViT backbone in eval mode. This is a plain callable, not
    an ``nn.Module``, so the owner's state dict keeps the module's keys once.

    Args:
        module: the frozen module; its state (checkpoint loaded) must be final at the first call.
        cache_dir: the cache root; entries of other modules and checkpoints live beside each other.
        config_attrs: module attributes that change its output without changing its weights.
        compute: what computes the features of a batch (default: ``module`` itself; a module that
            owns its cache passes its uncached forward; a backbone its ``forward_features``).
        max_gb: size cap of ``cache_dir`` (see :class:`FrozenFeatureCache`).
    """

    def __init__(
        self,
        module: nn.Module,
        cache_dir: Union[str, os.PathLike],
        config_attrs: Iterable[str] = (),
        compute: Optional[Callable] = None,
        max_gb: Optional[float] = None,
    ):
        if any(p.requires_grad for p in module.parameters()):
            raise ValueError("a feature cache needs a frozen module; freeze it or turn the cache off")
        self.module = module
        self.compute = compute or module
        self.cache_dir = cache_dir
        self.config_attrs = tuple(config_attrs)
        self.max_gb = max_gb
        # a bad folder or cap fails here, when the model is built, not at the first batch
        _check_folder(Path(cache_dir).expanduser())
        _max_bytes(max_gb)
        self._cache: Optional[FrozenFeatureCache] = None

    @property
    def cache(self) -> FrozenFeatureCache:
        if self._cache is None:
            method = "forward" if self.compute is self.module else getattr(self.compute, "__name__", "compute")
            fingerprint = module_fingerprint(self.module, self.config_attrs, method)
            self._cache = FrozenFeatureCache(self.cache_dir, fingerprint, self.max_gb)
            logger.info("frozen-feature cache in %s", self._cache.root)
        return self._cache

    def __call__(self, x: torch.Tensor):
        """``compute(x)`` for a batch ``x``; the output is a tensor, a tuple / list of tensors (e.g.
        the several encoder layers an MLA neck reads) or a ``{name: tensor}`` dict, batch first."""
        cache = self.cache
        keys = [cache.input_key(x[i]) for i in range(x.shape[0])]
        found = [cache.load(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            with torch.no_grad():
                fresh = self.compute(x[missing])
            names = list(fresh) if isinstance(fresh, dict) else None
            sequence = isinstance(fresh, (tuple, list))
            parts = list(fresh.values()) if names is not None else fresh if sequence else (fresh,)
            for j, i in enumerate(missing):
                found[i] = {"outputs": [_compact(p[j]) for p in parts], "sequence": sequence, "names": names}
                cache.save(keys[i], found[i])
        cache.hits += x.shape[0] - len(missing)
        cache.misses += len(missing)
        outputs = [
            torch.stack([_expand(f["outputs"][k]) for f in found]).to(x.device) for k in range(len(found[0]["outputs"]))
        ]
        names = found[0].get("names")
        if names is not None:
            return dict(zip(names, outputs))
        return tuple(outputs) if found[0]["sequence"] else outputs[0]
