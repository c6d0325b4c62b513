"""Reading checkpoints safely: ``torch.load(weights_only=True)`` with an explicit allow-list, and
errors that name the file, what was expected and how to fix it.

One reader for every foreign checkpoint the package loads (ViM, timm / DeiT ViT, RVT Lightning
files); the model-specific checks (which keys mark the family) stay with the model.
"""

import os
import re
from typing import Any, Dict, Iterable, Optional, Sequence

import torch

__all__ = ["read_checkpoint", "find_state_dict", "abbreviate"]

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def abbreviate(keys: Iterable[str], n: int = 8) -> str:
    """``a, b, c, ... (+12)``: the first ``n`` keys of a long list."""
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def read_checkpoint(path, *, what: str, allow: Sequence = (), missing_fix: str = "", unsafe_fix: str = "") -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` under ``allow``.

    Args:
        path: the file.
        what: what the file should be, for the messages (``"ViM checkpoint"``).
        allow: extra classes (or ``(obj, "module.name")`` pairs) for the weights-only unpickler.
        missing_fix: appended to the not-found message (where to put the file / how to go without).
        unsafe_fix: appended when the file pickles a class outside the allow-list.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``{path} is not a loadable {what} ({why})``: not a PyTorch file, truncated,
            or holding objects the weights-only unpickler refuses (the class is named).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}" + (f". {missing_fix}" if missing_fix else ""))
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # unreadable (permissions, I/O): the OS error names the file already
    except Exception as e:  # anything torch.load raises on a foreign or damaged file
        text = f"{e} {e.__context__ or ''}"
        found = _UNSUPPORTED_GLOBAL.search(text)
        if found:
            why = f"it stores objects of class {found.group(1)}, which torch.load(weights_only=True) refuses" + (
                f"; {unsafe_fix}" if unsafe_fix else ""
            )
        else:
            first = (str(e.__context__ or e).strip().splitlines() or [type(e).__name__])[0]
            why = f"torch.load(weights_only=True) failed: {first}"
        raise ValueError(f"{path} is not a loadable {what} ({why})") from e


def find_state_dict(
    obj: Any,
    *,
    path,
    what: str,
    wrappers: Sequence[str] = ("model", "state_dict"),
    strip_prefix: Optional[str] = "module.",
) -> Dict[str, torch.Tensor]:
    """The tensor state dict in ``obj``: bare, or under the first of ``wrappers`` that holds a dict.

    A ``strip_prefix`` carried by every key (``module.``: DistributedDataParallel) is removed.
    Raises ValueError ``{path} holds no {what} (...; found ...)`` when there is none.
    """
    state = obj
    if isinstance(obj, dict):
        for key in wrappers:
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        found = f"a dict with keys {abbreviate(sorted(map(str, obj)))}" if isinstance(obj, dict) else type(obj).__name__
        under = " / ".join(repr(w) for w in wrappers)
        raise ValueError(
            f"{os.fspath(path)} holds no {what} (expected a dict of tensors, bare or under {under}; found {found})"
        )
    if strip_prefix and all(k.startswith(strip_prefix) for k in state):
        state = {k[len(strip_prefix) :]: v for k, v in state.items()}
    return dict(state)
