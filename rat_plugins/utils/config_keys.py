"""Unknown-key errors with "did you mean", for detectron2 LazyConfigs and OpenMMLab configs alike."""

import difflib
from typing import Iterable, Mapping, Sequence

__all__ = ["ConfigError", "config_keys", "did_you_mean", "unknown_key_error"]


class ConfigError(ValueError):
    """A config file, a ``key=value`` override or ``--cfg-options`` entry that cannot be used as given."""


def did_you_mean(word: str, known: Iterable[str], n: int = 3) -> str:
    """`` Did you mean a, b?`` (with a leading space), or ``""`` when nothing is close."""
    close = difflib.get_close_matches(word, sorted(known), n=n)
    return f" Did you mean {', '.join(close)}?" if close else ""


def config_keys(node, prefix: str = "") -> set:
    """Every dotted key of a nested mapping / sequence config; list items by index (``a.0.b``)."""
    keys = set()
    if isinstance(node, Mapping) or hasattr(node, "keys"):
        items = ((k, node[k]) for k in node.keys())
    elif isinstance(node, Sequence) and not isinstance(node, (str, bytes)):
        items = enumerate(node)
    else:
        return keys
    for k, v in items:
        key = f"{prefix}{k}"
        keys.add(key)
        keys |= config_keys(v, key + ".")
    return keys


def unknown_key_error(key: str, known: Iterable[str], where: str, fix: str = "") -> ConfigError:
    """``ConfigError("{where} key 'x.y' is not in the config. Did you mean ...? {fix}")``."""
    return ConfigError(
        f"{where} key {key!r} is not in the config.{did_you_mean(key, known)}" + (f" {fix}" if fix else "")
    )
