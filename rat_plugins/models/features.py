"""The multi-scale output contract every backbone in :mod:`rat_plugins.models` follows.

- ``backbone.feature_info``: a list of :class:`FeatureInfo`, one per map the backbone can return,
  in order (timm's ``feature_info`` idea): the map's name, its stride in input pixels (a number,
  or one per axis for anisotropic / 3D inputs) and its channels.
- ``backbone.forward_features(x) -> Dict[str, Tensor]``: an ordered ``{name: NC[D]HW map}`` with
  the names and order of ``feature_info``. Recurrent backbones return ``(features, states)``.

Adapters pick maps by name (:func:`select_features`) and read strides and channels from
``feature_info``; they never renumber.
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch

__all__ = ["FeatureInfo", "feature_names", "select_features", "resolve_out_features"]

Stride = Union[int, float, Tuple[Union[int, float], ...]]


@dataclass(frozen=True)
class FeatureInfo:
    """One output map of a backbone: its name, its stride in input pixels and its channels."""

    name: str
    stride: Stride
    channels: int


def feature_names(feature_info: Sequence[FeatureInfo]) -> List[str]:
    return [info.name for info in feature_info]


def resolve_out_features(feature_info: Sequence[FeatureInfo], wanted=None) -> Tuple[str, ...]:
    """Names of the wanted maps: None (all), names, or 0-based indices into ``feature_info``.

    Raises ValueError naming the unknown entries and the known names.
    """
    names = feature_names(feature_info)
    if wanted is None:
        return tuple(names)
    if isinstance(wanted, (str, int)):
        wanted = [wanted]
    out = []
    for item in wanted:
        if isinstance(item, str) and item in names:
            out.append(item)
        elif not isinstance(item, (str, bool)) and int(item) == item and 0 <= int(item) < len(names):
            out.append(names[int(item)])
        else:
            raise ValueError(f"unknown feature {item!r}: the backbone returns {names} (by name or 0-based index)")
    if not out:
        raise ValueError(f"no feature selected; the backbone returns {names}")
    return tuple(out)


def select_features(features: Mapping[str, torch.Tensor], names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """``{name: features[name]}`` for ``names``, in that order."""
    missing = [n for n in names if n not in features]
    if missing:
        raise KeyError(f"features {missing} not in the backbone output {list(features)}")
    return {n: features[n] for n in names}
