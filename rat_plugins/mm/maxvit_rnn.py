"""RVT's MaxViT-RNN as an mmdet backbone (``type='MaxViTRNN'``)."""

from typing import Optional, Sequence, Tuple

from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.model import BaseModule
from torch import Tensor

from ..models.features import feature_names, resolve_out_features, select_features
from ..models.maxvit_rnn import create_maxvit_rnn, load_rvt_checkpoint

__all__ = ["MaxViTRNN"]


@MMDET_MODELS.register_module()
class MaxViTRNN(BaseModule):
    """:class:`rat_plugins.models.maxvit_rnn.MaxViTRNN` returning a tuple of stage maps.

    ``forward(x)`` treats every call as the first step of a sequence (zero LSTM state), which is
    what single-frame detectors need; :meth:`forward_clip` runs a clip recurrently (the model's
    ``forward_clip`` with its ``valid`` / ``is_first`` masks) and returns the last step's maps.

    Args:
        variant: ``tiny`` / ``small`` / ``base`` (RVT's published sizes).
        out_indices: stages to return, in order: 0-based indices (mmdet convention) or feature
            names. ``(1, 2, 3)`` are RVT's ``in_stages`` [2, 3, 4], ``(0, 1, 2, 3)`` all four.
        checkpoint: an official RVT Lightning checkpoint whose ``mdl.backbone.*`` weights
            :meth:`init_weights` loads strictly (None / "": keep the random init).
        stem_mismatch: what a patch-4 checkpoint does to a patch-2 model (see
            :func:`~rat_plugins.models.maxvit_rnn.load_rvt_checkpoint`).
        init_cfg: mmengine init config.
        **kwargs: overrides passed to the model (patch_size, partition_split, in_chans, ...).
    """

    def __init__(
        self,
        variant: str = "tiny",
        out_indices: Sequence = (1, 2, 3),
        checkpoint: Optional[str] = None,
        stem_mismatch: str = "reinit",
        init_cfg=None,
        **kwargs,
    ):
        super().__init__(init_cfg)
        self.net = create_maxvit_rnn(variant, **kwargs)
        try:
            self.out_features = resolve_out_features(self.net.feature_info, out_indices)
        except ValueError as e:
            raise ValueError(f"out_indices={out_indices!r}: {e}") from e
        names = feature_names(self.net.feature_info)
        self.out_indices = tuple(names.index(n) for n in self.out_features)
        self.checkpoint = checkpoint or None
        self.stem_mismatch = stem_mismatch
        self.checkpoint_report = None

    def _selected_info(self):
        info = {i.name: i for i in self.net.feature_info}
        return [info[n] for n in self.out_features]

    @property
    def out_channels(self) -> Tuple[int, ...]:
        return tuple(i.channels for i in self._selected_info())

    @property
    def strides(self) -> Tuple[int, ...]:
        return tuple(i.stride for i in self._selected_info())

    @property
    def pad_multiple(self) -> int:
        return self.net.pad_multiple

    def init_weights(self):
        super().init_weights()
        if self.checkpoint:
            self.checkpoint_report = load_rvt_checkpoint(self.net, self.checkpoint, self.stem_mismatch)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        features, _ = self.net(x)
        return tuple(select_features(features, self.out_features).values())

    def forward_clip(
        self,
        clip: Tensor,
        valid: Optional[Tensor] = None,
        is_first: Optional[Tensor] = None,
        prev_states=None,
        return_states: bool = False,
    ):
        """The selected maps of the last step of ``clip`` [B, T, C, H, W], from ``prev_states`` (None:
        a zero state); with ``return_states`` also the states after the last step, ``(maps, states)``."""
        features, states = self.net.forward_clip(clip, prev_states, return_all=False, valid=valid, is_first=is_first)
        maps = tuple(select_features(features, self.out_features).values())
        return (maps, states) if return_states else maps
