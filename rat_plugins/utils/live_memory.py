"""Peak bytes of the tensors a piece of code allocates, on any device, measured exactly.

:class:`LiveTensorBytes` is a ``TorchDispatchMode``: every tensor an op returns is counted by its
storage until the last Python reference to that storage's tensors goes, so ``peak`` is the largest
sum of live tensor storages the code held at once (what a caching allocator needs at least; the
process's RSS adds the allocator's slack, Python and the libraries). Storages the code did not
allocate (parameters, inputs, and views of them) are not counted. Meant for inference
(``torch.no_grad``): tensors that autograd keeps alive after their Python objects are gone may be
released early in the count.
"""

import weakref
from typing import Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorBytes"]


def _storage_key(tensor: torch.Tensor):
    storage = tensor.untyped_storage()
    return (tensor.device, storage.data_ptr()), storage.nbytes()


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as memory: ...``; then ``memory.peak`` (bytes) and ``memory.live``."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: Dict[tuple, List[int]] = {}  # key -> [bytes, live tensors]

    def _release(self, key) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[key]

    def _track(self, tensor: torch.Tensor, external: set) -> None:
        key, nbytes = _storage_key(tensor)
        if key[1] == 0:  # empty or a meta tensor: no memory
            return
        entry = self._storages.get(key)
        if entry is None:
            if key in external:  # an input, or a view of one: allocated before
                return
            entry = self._storages[key] = [nbytes, 0]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        external = {
            _storage_key(t)[0]
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and _storage_key(t)[0] not in self._storages
        }
        out = func(*args, **kwargs)
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._track(value, external)
        return out
