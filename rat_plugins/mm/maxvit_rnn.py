"""RVT's MaxViT-RNN as an mmdet backbone (``type='MaxViTRNN'``)."""
from typing import Optional, Sequence

from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.model import BaseModule

from ..models.maxvit_rnn import create_maxvit_rnn, load_rvt_checkpoint

__all__ = ["MaxViTRNN"]


@MMDET_MODELS.register_module()
class MaxViTRNN(BaseModule):
    """:class:`rat_plugins.models.maxvit_rnn.MaxVitRnn` returning a tuple of stage maps.

    ``forward(x)`` treats every call as the first step of a sequence (zero LSTM state), which is
    what single-frame detectors need. Recurrent detectors use ``self.net`` directly:
    ``self.net(x, prev_states)`` / ``self.net.forward_clip(clip, prev_states, sequence_start)``.

    Args:
        variant: ``tiny`` / ``small`` / ``base`` (RVT's published sizes).
        out_indices: 0-based stages to return, in order (mmdet convention): ``(1, 2, 3)`` are RVT's
            ``in_stages`` [2, 3, 4], ``(0, 1, 2, 3)`` all four. Strides ``patch * 2^index``.
        checkpoint: an official RVT Lightning checkpoint whose ``mdl.backbone.*`` weights
            :meth:`init_weights` loads strictly (None / "": keep the random init).
        stem_mismatch: what a patch-4 checkpoint does to a patch-2 model (see
            :func:`~rat_plugins.models.maxvit_rnn.load_rvt_checkpoint`).
        init_cfg: mmengine init config.
        **kwargs: overrides passed to ``MaxVitRnn`` (patch_size, partition_split, in_chans, ...).
    """

    def __init__(self, variant: str = "tiny", out_indices: Sequence[int] = (1, 2, 3),
                 checkpoint: Optional[str] = None, stem_mismatch: str = "reinit", init_cfg=None, **kwargs):
        super().__init__(init_cfg)
        self.net = create_maxvit_rnn(variant, **kwargs)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices or any(i not in range(len(self.net.stages)) for i in out_indices):
            raise ValueError(f"out_indices must be 0-based stage indices in 0..{len(self.net.stages) - 1}, "
                             f"got {out_indices}")
        self.out_indices = out_indices
        self.checkpoint = checkpoint or None
        self.stem_mismatch = stem_mismatch
        self.checkpoint_report = None

    @property
    def out_channels(self):
        return tuple(self.net.stage_dims[i] for i in self.out_indices)

    @property
    def strides(self):
        return tuple(self.net.strides[i] for i in self.out_indices)

    def init_weights(self):
        super().init_weights()
        if self.checkpoint:
            self.checkpoint_report = load_rvt_checkpoint(self.net, self.checkpoint, self.stem_mismatch)

    def forward(self, x):
        features, _ = self.net(x)
        return tuple(features[i + 1] for i in self.out_indices)
