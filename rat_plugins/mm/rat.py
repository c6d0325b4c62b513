"""RAT (Resolution Aware Transformer) as an mmseg backbone (``type='RAT'``; ``'RATAblation'`` is an alias)."""

from typing import Optional, Sequence, Union

from mmengine.model import BaseModule
from mmseg.registry import MODELS

from ..models.features import select_features
from ..models.rat_backbone import RATBackbone

__all__ = ["RAT"]


@MODELS.register_module()
class RAT(BaseModule):
    """:class:`rat_plugins.models.rat_backbone.RATBackbone` returning a tuple of maps.

    mmseg feeds one batch tensor; with ``scales=(1.0, 0.5, 0.25)`` the backbone resizes it to
    each pyramid level itself. Its maps are named ``level<l>_block<b>``; which ones come back, in
    order, is chosen by ``out_features``:

    - ``'all'`` (default): every map, level-major (``level0_block0, level0_block1, ...``);
    - ``'by_stride'``: every map, finest stride first, ties finer level first: the fine-to-coarse
      order UPerHead expects (its pyramid pooling sits on the last, coarsest map);
    - names (``['level0_block1', 'level1_block1']``) or 0-based indices into ``net.feature_info``.

    ``out_indices`` (mmseg's usual argument) takes 0-based indices instead; give one of the two.
    :attr:`out_channels` and :attr:`strides` describe the returned maps.

    Args:
        out_features: the maps to return, see above.
        out_indices: the same by index (older configs).
        init_cfg: mmengine init config.
        **kwargs: passed to ``RATBackbone`` (spatial_dims, input_features, feature_dims, num_blocks,
            num_heads, scales, attention (incl. ``'mha'``), local_window, pos_embed, abs_ref_size,
            spacing, ...).
    """

    def __init__(
        self,
        out_features: Union[None, str, Sequence[Union[str, int]]] = None,
        out_indices: Optional[Sequence[int]] = None,
        init_cfg=None,
        **kwargs,
    ):
        super().__init__(init_cfg)
        if out_features is not None and out_indices is not None:
            raise ValueError(
                f"RAT: give out_features or out_indices, not both (got {out_features!r} and {out_indices!r})"
            )
        self.net = RATBackbone(**kwargs)
        if out_indices is not None:
            self.out_features = self.net.resolve_out_features([int(i) for i in out_indices], arg="out_indices")
        else:
            self.out_features = self.net.resolve_out_features(out_features)
        names = [info.name for info in self.net.feature_info]
        self.out_indices = tuple(names.index(name) for name in self.out_features)  # into net.feature_info
        self._selected = [self.net.feature_info[i] for i in self.out_indices]

    @property
    def out_channels(self):
        return tuple(info.channels for info in self._selected)

    @property
    def strides(self):
        """Per-axis stride of each returned map."""
        return tuple(info.stride for info in self._selected)

    def forward(self, x):
        return tuple(select_features(self.net.forward_features(x), self.out_features).values())


# the ablation options (pos_embed, attention='mha') are RATBackbone arguments; older configs say RATAblation
MODELS.register_module(name="RATAblation", module=RAT)
