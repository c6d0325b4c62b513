"""What a run was started with, kept in its work dir: the flattened config, the seed and the
deterministic settings.

A run started again in the same work dir compares its config with the recorded one, so a changed
learning rate never silently resumes (or reports as finished) the old run.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from ..utils.atomic import atomic_write_json
from ..utils.config_keys import ConfigError

__all__ = [
    "RUN_CONFIG_NAME",
    "RunConfigChangedError",
    "flatten_config",
    "config_differences",
    "check_same_config",
    "record_run_config",
    "reproducibility_settings",
]

RUN_CONFIG_NAME = "run_config.json"


class RunConfigChangedError(ConfigError):
    """The work dir holds a run started with another config."""


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return repr(value)


def flatten_config(node: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a.b.0.c": value}`` of a nested config (dicts, OmegaConf / mmengine nodes, lists of dicts).

    Leaves become JSON values; objects (a LazyCall target, a class) their ``repr``.
    """
    if hasattr(node, "keys") and not isinstance(node, (str, bytes)):
        out = {}
        for key in node.keys():
            out.update(flatten_config(node[key], f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    if isinstance(node, (list, tuple)) and any(hasattr(v, "keys") for v in node):
        out = {}
        for i, value in enumerate(node):
            out.update(flatten_config(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: _plain(node)}


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = ()) -> List[str]:
    """Keys whose values differ (or that exist on one side only), sorted, less ``ignore`` (prefixes)."""
    ignore = tuple(ignore)
    keys = sorted(set(old) | set(new))
    return [k for k in keys if not k.startswith(ignore) and old.get(k, "<absent>") != new.get(k, "<absent>")]


def _describe(key: str, old: Mapping, new: Mapping) -> str:
    def show(side):
        value = side.get(key, "<absent>")
        text = json.dumps(value) if not isinstance(value, str) else value
        return text if len(text) <= 60 else text[:57] + "..."

    return f"{key}: {show(old)} -> {show(new)}"


def check_same_config(work_dir, flat: Mapping[str, Any], ignore: Iterable[str] = (), what: str = "run") -> None:
    """Refuse (RunConfigChangedError naming the differing keys) when ``work_dir`` holds a run with
    another config; no record yet (a new or an older run dir) passes."""
    path = Path(work_dir) / RUN_CONFIG_NAME
    try:
        recorded = json.loads(path.read_text())["config"]
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError):
        return  # an unreadable record cannot be compared; it is rewritten at start
    differing = config_differences(recorded, flat, ignore)
    if differing:
        shown = "; ".join(_describe(k, recorded, flat) for k in differing[:8])
        more = f" (+{len(differing) - 8} more)" if len(differing) > 8 else ""
        keys = "1 key differs" if len(differing) == 1 else f"{len(differing)} keys differ"
        raise RunConfigChangedError(
            f"{work_dir} holds a {what} started with another config ({keys}: {shown}{more}). "
            f"Use a new work dir for the new config, or restore the old values to continue that run"
        )


def reproducibility_settings(seed: Optional[int], deterministic: bool) -> Dict[str, Any]:
    import torch

    return dict(
        seed=seed,
        deterministic=bool(deterministic),
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
        deterministic_algorithms=bool(torch.are_deterministic_algorithms_enabled()),
        torch=torch.__version__,
        pythonhashseed=os.environ.get("PYTHONHASHSEED"),
    )


def record_run_config(work_dir, flat: Mapping[str, Any], reproducibility: Mapping[str, Any]) -> Path:
    """Write ``<work_dir>/run_config.json`` (config + seed settings) atomically; return its path."""
    path = Path(work_dir) / RUN_CONFIG_NAME
    atomic_write_json(path, dict(config=dict(flat), reproducibility=dict(reproducibility)), indent=1, sort_keys=True)
    return path
