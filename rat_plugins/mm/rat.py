"""RAT (Resolution Aware Transformer) as an mmseg backbone (``type='RAT'``)."""
from typing import Optional, Sequence

from mmengine.model import BaseModule
from mmseg.registry import MODELS

from ..models.rat_backbone import RATBackbone

__all__ = ["RAT"]


@MODELS.register_module()
class RAT(BaseModule):
    """:class:`rat_plugins.models.rat_backbone.RATBackbone` returning a tuple of maps.

    mmseg feeds one batch tensor; with ``scales=(1.0, 0.5, 0.25)`` the backbone resizes it to
    each pyramid level itself. Maps are numbered level-major: index ``level * num_blocks + block``
    (:attr:`out_channels` and :attr:`strides` describe the selected ones).

    Args:
        out_indices: maps to return, in order (default: all).
        init_cfg: mmengine init config.
        **kwargs: passed to ``RATBackbone`` (spatial_dims, input_features, feature_dims,
            num_blocks, num_heads, scales, attention, local_window, spacing, ...).
    """

    def __init__(self, out_indices: Optional[Sequence[int]] = None, init_cfg=None, **kwargs):
        super().__init__(init_cfg)
        self.net = RATBackbone(**kwargs)
        count = len(self.net.feature_info)
        self.out_indices = tuple(int(i) for i in out_indices) if out_indices is not None else tuple(range(count))
        if not self.out_indices or any(i not in range(count) for i in self.out_indices):
            raise ValueError(f"out_indices must be in 0..{count - 1} "
                             f"({[i.name for i in self.net.feature_info]}), got {out_indices}")

    @property
    def out_channels(self):
        return tuple(self.net.feature_info[i].channels for i in self.out_indices)

    @property
    def strides(self):
        """Per-axis stride of each returned map."""
        return tuple(self.net.feature_info[i].stride for i in self.out_indices)

    def forward(self, x):
        features = list(self.net.forward_features(x).values())
        return tuple(features[i] for i in self.out_indices)
