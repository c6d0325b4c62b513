"""YOLOX-style PAFPN over any number (>= 2) of backbone maps, loading RVT's ``mdl.fpn.*`` weights.

Ge et al., "YOLOX: Exceeding YOLO Series in 2021"; the neck of RVT (github.com/uzh-rpg/RVT,
``models/detection/yolox_extension/models/yolo_pafpn.py``). Three levels are exactly RVT's
``YOLOPAFPN``; four levels (a patch-2 backbone) add one top-down and one bottom-up step. Key layout:
docs/formats.md, "RVT checkpoints".
"""

import logging
import os
from collections import Counter
from functools import partial
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import select_features
from .maxvit_rnn import read_rvt_checkpoint, with_lightning_prefix

__all__ = [
    "ConvNormAct",
    "DepthwiseSeparableConv",
    "CspBottleneck",
    "CspLayer",
    "YoloxPafpn",
    "RVT_FPN_PREFIX",
    "RVT_HEAD_STEMS_PREFIX",
    "RVT_FPN_MODULES",
    "rvt_fpn_key_map",
    "convert_rvt_to_yolox_pafpn",
    "load_rvt_fpn",
]

logger = logging.getLogger(__name__)

_ACTIVATIONS = {
    "silu": partial(nn.SiLU, inplace=True),
    "relu": partial(nn.ReLU, inplace=True),
    "lrelu": partial(nn.LeakyReLU, 0.1, inplace=True),
}


# ------------------------------------------------------------------------------------------------
# blocks


class ConvNormAct(nn.Module):
    """``Conv2d`` ("same" padding, no bias) -> ``BatchNorm2d`` -> activation (``conv`` / ``bn``)."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1, act: str = "silu"
    ):
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = _ACTIVATIONS[act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparableConv(nn.Module):
    """Depthwise ``k x k`` conv-BN-act (``dconv``) then pointwise 1x1 conv-BN-act (``pconv``)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, act: str = "silu"):
        super().__init__()
        self.dconv = ConvNormAct(in_chs, in_chs, kernel_size, stride, groups=in_chs, act=act)
        self.pconv = ConvNormAct(in_chs, out_chs, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pconv(self.dconv(x))


def _conv3x3(in_chs: int, out_chs: int, stride: int, depthwise: bool, act: str) -> nn.Module:
    if depthwise:
        return DepthwiseSeparableConv(in_chs, out_chs, 3, stride, act=act)
    return ConvNormAct(in_chs, out_chs, 3, stride, act=act)


class CspBottleneck(nn.Module):
    """1x1 conv (``conv1``) then 3x3 conv (``conv2``), plus the input when ``shortcut`` and the
    widths agree."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        shortcut: bool = True,
        expansion: float = 1.0,
        depthwise: bool = False,
        act: str = "silu",
    ):
        super().__init__()
        hidden = int(out_chs * expansion)
        self.conv1 = ConvNormAct(in_chs, hidden, 1, act=act)
        self.conv2 = _conv3x3(hidden, out_chs, 1, depthwise, act)
        self.residual = shortcut and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.residual else y


class CspLayer(nn.Module):
    """Cross-stage-partial layer: ``conv3(cat[m(conv1(x)), conv2(x)])``, branches ``out/2`` wide.

    Args:
        in_chs / out_chs: channels.
        num_blocks: bottlenecks in ``m`` (``round(3 * depth)`` in the PAFPN).
        shortcut: residual bottlenecks (False in the PAFPN).
        depthwise: depthwise-separable 3x3 convs in the bottlenecks.
        act: ``silu`` / ``relu`` / ``lrelu``.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        num_blocks: int = 1,
        shortcut: bool = True,
        depthwise: bool = False,
        act: str = "silu",
    ):
        super().__init__()
        hidden = out_chs // 2
        self.conv1 = ConvNormAct(in_chs, hidden, 1, act=act)
        self.conv2 = ConvNormAct(in_chs, hidden, 1, act=act)
        self.conv3 = ConvNormAct(2 * hidden, out_chs, 1, act=act)
        self.m = nn.Sequential(
            *(CspBottleneck(hidden, hidden, shortcut, 1.0, depthwise, act) for _ in range(num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.cat([self.m(self.conv1(x)), self.conv2(x)], dim=1))


# ------------------------------------------------------------------------------------------------
# model


class YoloxPafpn(nn.Module):
    """YOLOX PAFPN over ``n = len(in_channels) >= 2`` levels, fine to coarse.

    Top-down step ``k = 0 .. n-2`` at level ``j = n-1-k``: ``lateral_convs[k]`` (1x1, ``C_j ->
    C_{j-1}``) on the coarsest input or the previous top-down output, nearest upsampling,
    ``cat[upsampled, input_{j-1}]``, ``top_down_blocks[k]`` (CSP ``2 C_{j-1} -> C_{j-1}``); the
    last top-down output is output 0. Bottom-up step ``k``: ``downsample_convs[k]`` (3x3 stride 2,
    ``C_k -> C_k``), ``cat[downsampled, lateral output at level k+1]``, ``bottom_up_blocks[k]`` (CSP
    ``2 C_k -> C_{k+1}``) gives output ``k+1``. CSP layers have ``round(3 * depth)`` bottlenecks
    without residual. Outputs keep each input's resolution and channels (RVT has no width
    multiplier).

    Args:
        in_channels: channels of the input maps, fine to coarse (each level half the resolution of
            the previous one).
        depth: depth multiplier (RVT: tiny 0.33, small / base 0.67).
        in_features: names of the maps to take when :meth:`forward` gets a ``{name: map}`` dict
            (e.g. ``rvt_stage_names(in_stages)`` for a MaxViT-RNN); None takes the dict's maps in
            order.
        depthwise: depthwise-separable 3x3 convs (bottlenecks and bottom-up downsampling).
        act: ``silu`` (RVT) / ``relu`` / ``lrelu``.
        out_channels: None keeps the per-level channels (RVT); an int adds ``out_convs``, a 1x1
            conv-BN-act per level to that width (the layout of RVT's head ``stems``, so heads
            expecting one width, such as mmdet's ``YOLOXHead``, can follow).
        upsample_mode: ``F.interpolate`` mode of the top-down path (RVT: ``nearest-exact``).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        depth: float = 1.0,
        in_features: Optional[Sequence[str]] = None,
        depthwise: bool = False,
        act: str = "silu",
        out_channels: Optional[int] = None,
        upsample_mode: str = "nearest-exact",
    ):
        super().__init__()
        chs = tuple(int(c) for c in in_channels)
        if len(chs) < 2:
            raise ValueError(f"a PAFPN needs at least two input levels, got in_channels={chs}")
        if in_features is not None and len(in_features) != len(chs):
            raise ValueError(f"in_features {tuple(in_features)} and in_channels {chs} differ in length")
        self.in_channels = chs
        self.in_features = None if in_features is None else tuple(in_features)
        self.upsample_mode = upsample_mode
        n = len(chs)
        num_blocks = round(3 * depth)

        self.lateral_convs = nn.ModuleList()
        self.top_down_blocks = nn.ModuleList()
        for j in range(n - 1, 0, -1):  # coarse to fine
            self.lateral_convs.append(ConvNormAct(chs[j], chs[j - 1], 1, act=act))
            self.top_down_blocks.append(CspLayer(2 * chs[j - 1], chs[j - 1], num_blocks, False, depthwise, act))
        self.downsample_convs = nn.ModuleList()
        self.bottom_up_blocks = nn.ModuleList()
        for i in range(n - 1):  # fine to coarse
            self.downsample_convs.append(_conv3x3(chs[i], chs[i], 2, depthwise, act))
            self.bottom_up_blocks.append(CspLayer(2 * chs[i], chs[i + 1], num_blocks, False, depthwise, act))
        self.out_convs = None
        if out_channels is not None:
            self.out_convs = nn.ModuleList(ConvNormAct(c, int(out_channels), 1, act=act) for c in chs)
        self.out_channels = (int(out_channels),) * n if out_channels is not None else chs

    def forward(self, features: Union[Sequence[torch.Tensor], Mapping[str, torch.Tensor]]) -> Tuple[torch.Tensor, ...]:
        """Input maps fine to coarse (a sequence or an ordered ``{name: map}``) -> output maps,
        fine to coarse, at the inputs' resolutions."""
        if isinstance(features, Mapping):
            if self.in_features is not None:
                features = select_features(features, self.in_features)
            features = features.values()
        feats = list(features)
        n = len(self.in_channels)
        if len(feats) != n:
            raise ValueError(f"expected {n} input maps, got {len(feats)}")

        laterals = []  # laterals[k] lives at level n-1-k with channels C_{n-2-k}
        x = feats[-1]
        for k in range(n - 1):
            finer = feats[n - 2 - k]
            x = self.lateral_convs[k](x)
            laterals.append(x)
            # size= (not scale_factor=2) so odd map sizes from ceil-mode backbones still line up
            up = F.interpolate(x, size=finer.shape[-2:], mode=self.upsample_mode)
            x = self.top_down_blocks[k](torch.cat([up, finer], dim=1))

        outs = [x]
        for k in range(n - 1):
            down = self.downsample_convs[k](outs[-1])
            outs.append(self.bottom_up_blocks[k](torch.cat([down, laterals[n - 2 - k]], dim=1)))
        if self.out_convs is not None:
            outs = [conv(o) for conv, o in zip(self.out_convs, outs)]
        return tuple(outs)


# ------------------------------------------------------------------------------------------------
# checkpoints

RVT_FPN_PREFIX = "mdl.fpn."
RVT_HEAD_STEMS_PREFIX = "mdl.yolox_head.stems."

# RVT's (three-level) module names -> this module's, in RVT's forward order. Everything below a
# module (conv / bn, conv1..3, m.<i>.conv1/conv2, dconv / pconv) keeps its official name.
RVT_FPN_MODULES: Dict[str, str] = {
    "lateral_conv0": "lateral_convs.0",  # 1x1, C2 -> C1, on the coarsest input
    "C3_p4": "top_down_blocks.0",  # CSP 2*C1 -> C1 at level 1
    "reduce_conv1": "lateral_convs.1",  # 1x1, C1 -> C0
    "C3_p3": "top_down_blocks.1",  # CSP 2*C0 -> C0 at level 0 = output 0
    "bu_conv2": "downsample_convs.0",  # 3x3 s2, C0 -> C0
    "C3_n3": "bottom_up_blocks.0",  # CSP 2*C0 -> C1 = output 1
    "bu_conv1": "downsample_convs.1",  # 3x3 s2, C1 -> C1
    "C3_n4": "bottom_up_blocks.1",  # CSP 2*C1 -> C2 = output 2
}


def rvt_fpn_key_map(with_head_stems: bool = False, num_levels: int = 3) -> Dict[str, str]:
    """Official key prefix -> :class:`YoloxPafpn` key prefix (both ending in ``.``).

    ``mdl.fpn.<module>.`` maps by :data:`RVT_FPN_MODULES`; with ``with_head_stems`` also
    ``mdl.yolox_head.stems.<i>.`` -> ``out_convs.<i>.`` (for a PAFPN built with ``out_channels``
    equal to RVT's head width). A key converts by replacing its prefix; the rest is unchanged, e.g.
    ``mdl.fpn.C3_p4.m.0.conv2.bn.running_var`` -> ``top_down_blocks.0.m.0.conv2.bn.running_var``.
    """
    mapping = {f"{RVT_FPN_PREFIX}{official}.": f"{ours}." for official, ours in RVT_FPN_MODULES.items()}
    if with_head_stems:
        mapping.update({f"{RVT_HEAD_STEMS_PREFIX}{i}.": f"out_convs.{i}." for i in range(num_levels)})
    return mapping


def convert_rvt_to_yolox_pafpn(
    state_dict: Mapping[str, torch.Tensor], with_head_stems: bool = False
) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """RVT state dict -> (:class:`YoloxPafpn` state dict, ignored key prefixes with counts).

    Pure function. Takes the Lightning module's keys (``mdl.fpn.*``) or the detector's (``fpn.*``,
    ``yolox_head.stems.*``); backbone / other head keys are counted per prefix and left out.
    """
    state_dict = with_lightning_prefix(state_dict)
    mapping = rvt_fpn_key_map(with_head_stems)
    converted, ignored = {}, Counter()
    for key, value in state_dict.items():
        prefix = next((p for p in mapping if key.startswith(p)), None)
        if prefix is None:
            parts = key.split(".")
            ignored[".".join(parts[:2]) + "."] += 1
            continue
        converted[mapping[prefix] + key[len(prefix) :]] = value
    return converted, dict(sorted(ignored.items()))


def load_rvt_fpn(neck: YoloxPafpn, checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> Dict[str, int]:
    """Load RVT's PAFPN weights (and its head ``stems`` when ``neck`` has ``out_convs``) strictly.

    Args:
        neck: a three-level :class:`YoloxPafpn` with the checkpoint's channels and depth.
        checkpoint: an official Lightning ``.ckpt`` (read by
            :func:`~rat_plugins.models.maxvit_rnn.read_rvt_checkpoint`) or a state dict.

    Returns:
        ``{'loaded': number of tensors, <ignored prefix>: count, ...}`` (also logged).

    Raises:
        ValueError: a neck that is not three levels (RVT has no weights for another count), or a
            checkpoint that does not load strictly.
    """
    if len(neck.in_channels) != 3:
        raise ValueError(
            f"RVT checkpoints hold a three-level PAFPN; this one has {len(neck.in_channels)} "
            f"levels. Fix: load into a neck over three backbone maps, or train the neck from scratch"
        )
    if isinstance(checkpoint, Mapping):
        state_dict, source = checkpoint, "state dict"
    else:
        source = os.fspath(checkpoint)
        state_dict, _ = read_rvt_checkpoint(source)
    converted, ignored = convert_rvt_to_yolox_pafpn(state_dict, with_head_stems=neck.out_convs is not None)
    try:
        neck.load_state_dict(converted, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ValueError(
            f"{source}: RVT PAFPN weights do not load strictly ({detail}). Fix: build the neck "
            f"with the checkpoint's in_channels and depth (tiny 0.33, small / base 0.67)"
        ) from e
    report = {"loaded": len(converted), **ignored}
    logger.info("%s: loaded %d PAFPN tensors; ignored %s", source, len(converted), ignored or "nothing")
    return report
