"""RVT's MaxViT-RNN as a detectron2 Backbone: four maps named ``p<log2 stride>``."""

import math
from typing import Optional, Sequence

from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec

from ..models.features import FeatureInfo, resolve_out_features
from ..models.maxvit_rnn import create_maxvit_rnn, load_rvt_checkpoint

__all__ = ["MaxViTRNN", "build_maxvit_rnn_backbone", "add_maxvit_rnn_config"]


class MaxViTRNN(Backbone):
    """detectron2 wrapper of :class:`rat_plugins.models.maxvit_rnn.MaxViTRNN`.

    Outputs are named by stride as detectron2 does (``p<log2 stride>``): ``p1``-``p4`` for patch 2
    (strides 2/4/8/16), ``p2``-``p5`` for patch 4 (strides 4/8/16/32). Each call is a single frame
    (zero LSTM state); the recurrent API is on ``self.net``. ``size_divisibility`` is the padding
    multiple, so ImageList padding already satisfies the window partition and every map is
    exactly ``padded size / stride``.

    Args:
        variant: ``tiny`` / ``small`` / ``base``.
        out_features: names (or 0-based indices) to return (default: all four).
        checkpoint: official RVT Lightning checkpoint to load ("" / None: random init).
        stem_mismatch: see :func:`~rat_plugins.models.maxvit_rnn.load_rvt_checkpoint`.
        **kwargs: overrides passed to the model (in_chans, patch_size, partition_split, ...).
    """

    def __init__(
        self,
        variant: str = "tiny",
        out_features: Optional[Sequence[str]] = None,
        checkpoint: Optional[str] = None,
        stem_mismatch: str = "reinit",
        **kwargs,
    ):
        super().__init__()
        self.net = create_maxvit_rnn(variant, **kwargs)
        self.checkpoint_report = load_rvt_checkpoint(self.net, checkpoint, stem_mismatch) if checkpoint else None
        # detectron2's stride names for the model's maps, e.g. p3 <- stage2 (patch 4)
        self.feature_info = [
            FeatureInfo(f"p{int(math.log2(i.stride))}", i.stride, i.channels) for i in self.net.feature_info
        ]
        self._model_names = {d2.name: i.name for d2, i in zip(self.feature_info, self.net.feature_info)}
        try:
            self._out_features = list(resolve_out_features(self.feature_info, out_features or None))
        except ValueError as e:
            raise ValueError(f"out_features: {e} (patch {self.net.patch_size})") from e
        self._out_feature_strides = {i.name: i.stride for i in self.feature_info}
        self._out_feature_channels = {i.name: i.channels for i in self.feature_info}

    @property
    def size_divisibility(self) -> int:
        return self.net.pad_multiple

    @property
    def padding_constraints(self):
        return {"size_divisibility": self.net.pad_multiple}

    def forward(self, x):
        features, _ = self.net(x)
        return {name: features[self._model_names[name]] for name in self._out_features}


def add_maxvit_rnn_config(cfg: CfgNode) -> None:
    """Add ``MODEL.MAXVIT_RNN`` keys for yacs configs."""
    cfg.MODEL.MAXVIT_RNN = CfgNode()
    cfg.MODEL.MAXVIT_RNN.VARIANT = "tiny"
    cfg.MODEL.MAXVIT_RNN.PATCH_SIZE = 4
    cfg.MODEL.MAXVIT_RNN.PARTITION_SPLIT = 2
    cfg.MODEL.MAXVIT_RNN.OUT_FEATURES = []
    cfg.MODEL.MAXVIT_RNN.CHECKPOINT = ""


@BACKBONE_REGISTRY.register()
def build_maxvit_rnn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> MaxViTRNN:
    """yacs build function: ``MODEL.BACKBONE.NAME = "build_maxvit_rnn_backbone"`` after
    ``add_maxvit_rnn_config``; input channels come from ``input_shape`` (20 for RVT histograms)."""
    c = cfg.MODEL.MAXVIT_RNN
    return MaxViTRNN(
        variant=c.VARIANT,
        out_features=list(c.OUT_FEATURES) or None,
        checkpoint=c.CHECKPOINT or None,
        in_chans=input_shape.channels,
        patch_size=c.PATCH_SIZE,
        partition_split=c.PARTITION_SPLIT,
    )
