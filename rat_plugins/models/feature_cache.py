"""Disk cache for the outputs of a frozen backbone, one file per input image.

A frozen backbone maps the same input to the same features in every iteration, epoch and sweep
run, so on CPU recomputing them is most of a training step. An entry is keyed by the module's
fingerprint (class, configuration, every state-dict tensor, the method computing the features and
the rat_plugins version) and by a hash of the exact input tensor (which encodes the image, its
resize, flip and normalisation). Features are stored as float16 where they fit, float32 otherwise;
fresh features go through the same rounding, so a hit and a miss return the same values.
"""

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..utils.atomic import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["FrozenFeatureCache", "CachedFrozenForward", "module_fingerprint"]

_FLOAT16_MAX = 65504.0


def _tensor_digest(h, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def module_fingerprint(module: nn.Module, config_attrs: Iterable[str] = (), method: str = "forward") -> str:
    """Hash of what determines a frozen module's output apart from its input (``method``: what
    computes it, e.g. ``forward_features``)."""
    from .. import __version__

    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(module).__module__}.{type(module).__qualname__}|{__version__}|".encode())
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


def _compact(features: torch.Tensor) -> torch.Tensor:
    """float32 features as float16 where every value fits; anything else unchanged."""
    if features.dtype != torch.float32 or features.numel() == 0:
        return features
    if bool(torch.isfinite(features).all()) and float(features.abs().max()) < _FLOAT16_MAX:
        return features.to(torch.float16)
    return features


def _expand(features: torch.Tensor) -> torch.Tensor:
    return features.float() if features.dtype == torch.float16 else features


class FrozenFeatureCache:
    """Per-image feature files under ``root/<module fingerprint>/``, written atomically."""

    def __init__(self, root: Union[str, os.PathLike], fingerprint: str):
        self.root = Path(root).expanduser() / fingerprint
        self.hits = 0
        self.misses = 0

    @staticmethod
    def input_key(x: torch.Tensor) -> str:
        h = hashlib.blake2b(digest_size=20)
        _tensor_digest(h, x)
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def load(self, key: str) -> Optional[dict]:
        """``{"outputs": [per-output tensors of one image], "sequence": bool, "names": [...] or None}``
        or None."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not (isinstance(entry, dict) and isinstance(entry.get("outputs"), list)):
                raise ValueError("not a feature cache entry")
            return entry
        except Exception as e:  # a truncated or foreign file: recompute and replace it
            logger.warning("feature cache entry %s is unreadable (%s); recomputing it", path, e)
            return None

    def save(self, key: str, entry: dict) -> None:
        with atomic_path(self._path(key)) as tmp:  # readers see the old file or the whole new one
            torch.save(
                {
                    "outputs": [t.cpu().clone() for t in entry["outputs"]],
                    "sequence": entry["sequence"],
                    "names": entry.get("names"),
                },
                tmp,
            )


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
    """

    def __init__(
        self,
        module: nn.Module,
        cache_dir: Union[str, os.PathLike],
        config_attrs: Iterable[str] = (),
        compute: Optional[Callable] = None,
    ):
        if any(p.requires_grad for p in module.parameters()):
            raise ValueError("a feature cache needs a frozen module; freeze it or turn the cache off")
        self.module = module
        self.compute = compute or module
        self.cache_dir = cache_dir
        self.config_attrs = tuple(config_attrs)
        self._cache: Optional[FrozenFeatureCache] = None

    @property
    def cache(self) -> FrozenFeatureCache:
        if self._cache is None:
            method = "forward" if self.compute is self.module else getattr(self.compute, "__name__", "compute")
            self._cache = FrozenFeatureCache(self.cache_dir, module_fingerprint(self.module, self.config_attrs, method))
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
