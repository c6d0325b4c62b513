"""MaxViT-RNN: the recurrent event-camera backbone of RVT, with the official checkpoint layout.

Gehrig & Scaramuzza, "Recurrent Vision Transformers for Object Detection with Event Cameras", CVPR 2023
(github.com/uzh-rpg/RVT). Four stages of conv downsample, window / grid attention and a ConvLSTM whose
hidden state is the stage output; :meth:`MaxViTRNN.forward_clip` runs clips with per-sample sequence
starts and padding masks. Key layout and sizes: docs/formats.md, "RVT checkpoints".
"""

import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.checkpoint_io import find_state_dict, read_checkpoint
from .checkpointing import GradCheckpointing, run_block
from .features import FeatureInfo

__all__ = [
    "OverlapConvDownsample",
    "LayerScale",
    "partition_tokens",
    "merge_tokens",
    "Mlp",
    "PartitionSelfAttention",
    "PartitionAttentionBlock",
    "WindowGridBlockPair",
    "ConvLstmCell",
    "MaxViTRNNStage",
    "MaxViTRNN",
    "MaxVitRnn",
    "RVTCheckpointReport",
    "MAXVIT_RNN_VARIANTS",
    "RVT_BACKBONE_PREFIX",
    "with_lightning_prefix",
    "rvt_stage_names",
    "convert_rvt_to_maxvit_rnn",
    "rvt_backbone_architecture",
    "read_rvt_checkpoint",
    "load_rvt_checkpoint",
    "create_maxvit_rnn",
    "maxvit_rnn_tiny",
    "maxvit_rnn_small",
    "maxvit_rnn_base",
]

logger = logging.getLogger(__name__)

State = Tuple[torch.Tensor, torch.Tensor]  # (hidden, cell) of one stage, NCHW each
States = Optional[Sequence[Optional[State]]]


# ------------------------------------------------------------------------------------------------
# blocks


class OverlapConvDownsample(nn.Module):
    """NCHW -> NHWC: ``Conv2d(kernel 2f-1, stride f, padding f-1, no bias)`` + LayerNorm (eps 1e-5).

    With an input side divisible by ``f`` the output side is exactly ``side / f``.
    """

    def __init__(self, in_chs: int, out_chs: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size=2 * factor - 1, stride=factor, padding=factor - 1, bias=False
        )
        self.norm = nn.LayerNorm(out_chs, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class LayerScale(nn.Module):
    """Per-channel scale ``gamma`` (channels last), initialised small so blocks start near identity."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Linear(C, hidden) -> exact GELU -> Linear(hidden, C), channels last.

    The nesting only reproduces RVT's parameter names: ``net.0.0`` is the first linear layer,
    ``net.2`` the second (``net.1`` is a dropout slot, rate 0 in every published config).
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU()), nn.Dropout(drop), nn.Linear(hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def partition_tokens(x: torch.Tensor, size: Tuple[int, int], kind: str) -> torch.Tensor:
    """[B, H, W, C] -> [B * groups, size_h * size_w, C] attention groups.

    ``window``: contiguous ``size_h x size_w`` blocks. ``grid``: ``size_h x size_w`` tokens strided
    by ``(H / size_h, W / size_w)``, i.e. one token from every window, so together the two kinds
    mix information locally and across the whole map.
    """
    B, H, W, C = x.shape
    ph, pw = size
    if H % ph or W % pw:
        raise ValueError(f"a {H}x{W} map cannot be split into {kind} partitions of {ph}x{pw}")
    if kind == "window":  # axes: B, window row, row in window, window col, col in window, C
        x = x.reshape(B, H // ph, ph, W // pw, pw, C).permute(0, 1, 3, 2, 4, 5)
    else:  # axes: B, row in cell, cell row, col in cell, cell col, C (cells strided by H/ph, W/pw)
        x = x.reshape(B, ph, H // ph, pw, W // pw, C).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, ph * pw, C)


def merge_tokens(tokens: torch.Tensor, size: Tuple[int, int], kind: str, hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`partition_tokens`: [B * groups, size_h * size_w, C] -> [B, H, W, C]."""
    H, W = hw
    ph, pw = size
    C = tokens.shape[-1]
    if kind == "window":
        x = tokens.reshape(-1, H // ph, W // pw, ph, pw, C).permute(0, 1, 3, 2, 4, 5)
    else:
        x = tokens.reshape(-1, H // ph, W // pw, ph, pw, C).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, H, W, C)


class PartitionSelfAttention(nn.Module):
    """Multi-head softmax self-attention over token groups [N, L, C].

    ``qkv`` is one ``Linear(C, 3C)`` whose output RVT reads per head: ``[q_h | k_h | v_h]`` for
    head 0, then head 1, ... (not timm's ``[q | k | v]``), so checkpoints only load faithfully with
    this split.
    """

    def __init__(self, dim: int, dim_head: int = 32, bias: bool = True):
        super().__init__()
        if dim % dim_head:
            raise ValueError(f"channels {dim} are not a multiple of dim_head {dim_head}")
        self.num_heads = dim // dim_head
        self.dim_head = dim_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        N, L, C = tokens.shape
        qkv = self.qkv(tokens).reshape(N, L, self.num_heads, 3, self.dim_head).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)  # each [N, heads, L, dim_head]
        out = F.scaled_dot_product_attention(q, k, v)  # scale dim_head ** -0.5, as RVT
        return self.proj(out.transpose(1, 2).reshape(N, L, C))


class PartitionAttentionBlock(nn.Module):
    """Pre-norm transformer block over window or grid partitions (NHWC in and out).

    ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``. ``skip_norm1`` drops ``norm1``
    (and its keys) where the input is already normalised, as RVT does after each downsample.
    """

    def __init__(
        self,
        dim: int,
        kind: str,
        dim_head: int = 32,
        mlp_ratio: float = 4.0,
        ls_init_value: Optional[float] = 1e-5,
        norm_eps: float = 1e-5,
        skip_norm1: bool = False,
        drop: float = 0.0,
    ):
        super().__init__()
        if kind not in ("window", "grid"):
            raise ValueError(f"partition kind must be 'window' or 'grid', got {kind!r}")
        self.kind = kind
        self.norm1 = nn.Identity() if skip_norm1 else nn.LayerNorm(dim, eps=norm_eps)
        self.self_attn = PartitionSelfAttention(dim, dim_head)
        self.ls1 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.ls2 = LayerScale(dim, ls_init_value) if ls_init_value else nn.Identity()

    def attention(self, x: torch.Tensor, partition: Tuple[int, int]) -> torch.Tensor:
        tokens = self.self_attn(partition_tokens(x, partition, self.kind))
        return merge_tokens(tokens, partition, self.kind, x.shape[1:3])

    def forward(self, x: torch.Tensor, partition: Tuple[int, int]) -> torch.Tensor:
        x = x + self.ls1(self.attention(self.norm1(x), partition))
        return x + self.ls2(self.mlp(self.norm2(x)))


class WindowGridBlockPair(nn.Module):
    """One MaxViT step: window attention (local) then grid attention (global, dilated)."""

    def __init__(self, dim: int, skip_window_norm1: bool, **block_kwargs):
        super().__init__()
        self.att_window = PartitionAttentionBlock(dim, "window", skip_norm1=skip_window_norm1, **block_kwargs)
        self.att_grid = PartitionAttentionBlock(dim, "grid", **block_kwargs)

    def forward(self, x: torch.Tensor, partition: Tuple[int, int]) -> torch.Tensor:
        return self.att_grid(self.att_window(x, partition), partition)


class ConvLstmCell(nn.Module):
    """ConvLSTM with a 1x1 gate convolution (NCHW).

    ``conv1x1(cat[x, h_prev])`` gives 4C channels in the order forget, input, output (sigmoid) and
    cell candidate (tanh); ``c = f * c_prev + i * g``, ``h = o * tanh(c)``. No state = zeros.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.conv1x1 = nn.Conv2d(2 * dim, 4 * dim, kernel_size=1)

    def forward(self, x: torch.Tensor, state: Optional[State] = None) -> State:
        if state is None:
            h_prev = c_prev = torch.zeros_like(x)
        else:
            h_prev, c_prev = state
        forget, inp, out, candidate = self.conv1x1(torch.cat([x, h_prev], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(forget) * c_prev + torch.sigmoid(inp) * torch.tanh(candidate)
        h = torch.sigmoid(out) * torch.tanh(c)
        return h, c


class MaxViTRNNStage(GradCheckpointing, nn.Module):
    """Downsample -> block pairs -> ConvLSTM. NCHW in; the LSTM hidden state (NCHW) out."""

    def __init__(self, in_chs: int, dim: int, factor: int, depth: int = 1, **block_kwargs):
        super().__init__()
        self.downsample_cf2cl = OverlapConvDownsample(in_chs, dim, factor)
        # the downsample ends in a LayerNorm, so the stage's first window block needs no norm1
        self.att_blocks = nn.ModuleList(
            WindowGridBlockPair(dim, skip_window_norm1=i == 0, **block_kwargs) for i in range(depth)
        )
        self.lstm = ConvLstmCell(dim)

    def forward(
        self, x: torch.Tensor, partition: Tuple[int, int], state: Optional[State] = None
    ) -> Tuple[torch.Tensor, State]:
        x = self.downsample_cf2cl(x)
        for pair in self.att_blocks:
            x = run_block(pair, x, partition, enabled=self.grad_checkpointing)
        h, c = self.lstm(x.permute(0, 3, 1, 2).contiguous(), state)
        return h, (h, c)


# ------------------------------------------------------------------------------------------------
# model


def rvt_stage_names(in_stages: Sequence[int]) -> Tuple[str, ...]:
    """RVT's 1-based ``in_stages`` (e.g. ``[2, 3, 4]``) -> feature names (``stage2`` ...)."""
    return tuple(f"stage{int(s)}" for s in in_stages)


PARTITION_RULES = ("rvt", "deepest_stride")


class MaxViTRNN(nn.Module):
    """RVT's recurrent MaxViT backbone.

    Outputs follow the feature contract (:mod:`rat_plugins.models.features`): ``feature_info``
    names the four stage maps ``stage1`` .. ``stage4`` (RVT's 1-based stage numbers, see
    :func:`rvt_stage_names`), strides ``patch * 2^(s-1)``, channels ``embed_dim * dim_multiplier``.

    Inputs are zero-padded bottom / right to a multiple of ``pad_multiple``; the partition (window
    size and grid cell count, tokens per axis, the same in every stage) is ``padded side /
    pad_multiple``. ``partition_rule='rvt'`` (default) is RVT's rule for every patch size:
    ``pad_multiple = 32 * partition_split``, so an input gets the same partition at patch 2 as at
    patch 4 (a patch-2 model has twice the windows per axis in each stage). ``'deepest_stride'``
    follows the deepest stride instead (``16 * partition_split`` at patch 2: windows of 4x the area;
    the same as RVT's at patch 4). The rule changes no weight: checkpoints load under either. Output
    maps cover the padded input.

    Args:
        in_chans: input channels (20 for RVT's stacked histograms: 2 polarities x 10 time bins).
        embed_dim: stage-1 channels.
        dim_multiplier: per-stage channel multipliers (RVT: 1, 2, 4, 8).
        depths: window/grid block pairs per stage (RVT: 1 each).
        dim_head: channels per attention head (heads = stage channels / dim_head).
        patch_size: stem downsampling factor, 2 or 4.
        partition_split: windows per axis in the deepest stage at patch 4 (RVT's ``partition_split_32``:
            1 for Gen1, 2 for 1Mpx / eTraM).
        partition_rule: ``'rvt'`` or ``'deepest_stride'`` (see above).
        mlp_ratio: MLP hidden width / channels.
        ls_init_value: LayerScale initial value (0 or None: no LayerScale, and no ``gamma`` keys).
        norm_eps: LayerNorm eps inside the blocks.
        drop: MLP dropout rate (RVT: 0).
        grad_checkpointing: recompute each block pair's activations in the backward pass (less
            memory, one more forward); also ``set_grad_checkpointing()``.
    """

    def __init__(
        self,
        in_chans: int = 20,
        embed_dim: int = 64,
        dim_multiplier: Sequence[int] = (1, 2, 4, 8),
        depths: Sequence[int] = (1, 1, 1, 1),
        dim_head: int = 32,
        patch_size: int = 4,
        partition_split: int = 2,
        partition_rule: str = "rvt",
        mlp_ratio: float = 4.0,
        ls_init_value: Optional[float] = 1e-5,
        norm_eps: float = 1e-5,
        drop: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if patch_size not in (2, 4):
            raise ValueError(f"patch_size must be 2 or 4, got {patch_size}")
        if len(dim_multiplier) != 4 or len(depths) != 4:
            raise ValueError(
                f"MaxViT-RNN has four stages: got dim_multiplier {tuple(dim_multiplier)}, depths {tuple(depths)}"
            )
        if int(partition_split) < 1:
            raise ValueError(f"partition_split must be a positive integer, got {partition_split}")
        if partition_rule not in PARTITION_RULES:
            raise ValueError(f"partition_rule must be one of {PARTITION_RULES}, got {partition_rule!r}")
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.dim_head = dim_head
        self.patch_size = patch_size
        self.partition_split = int(partition_split)
        self.depths = tuple(int(d) for d in depths)
        self.stage_dims = tuple(embed_dim * m for m in dim_multiplier)
        self.strides = tuple(patch_size * 2**s for s in range(4))
        self.partition_rule = partition_rule
        # RVT: 32 * partition_split_32 whatever the stem (its stride-32 rule); else the deepest stride
        self.pad_multiple = (32 if partition_rule == "rvt" else self.strides[-1]) * self.partition_split
        block_kwargs = dict(
            dim_head=dim_head, mlp_ratio=mlp_ratio, ls_init_value=ls_init_value, norm_eps=norm_eps, drop=drop
        )
        stages, prev = [], in_chans
        for s, (dim, depth) in enumerate(zip(self.stage_dims, self.depths)):
            stages.append(MaxViTRNNStage(prev, dim, patch_size if s == 0 else 2, depth, **block_kwargs))
            prev = dim
        self.stages = nn.ModuleList(stages)
        self.set_grad_checkpointing(grad_checkpointing)
        self.feature_info = [
            FeatureInfo(name, stride, dim)
            for name, stride, dim in zip(rvt_stage_names(range(1, 5)), self.strides, self.stage_dims)
        ]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each window / grid block pair's activations in the backward pass (every stage)."""
        self.grad_checkpointing = bool(enable)
        for stage in self.stages:
            stage.set_grad_checkpointing(enable)

    # -- geometry ---------------------------------------------------------------------------------

    def padded_size(self, height: int, width: int) -> Tuple[int, int]:
        """Input size after the bottom / right zero padding (a multiple of ``pad_multiple``)."""
        m = self.pad_multiple
        return math.ceil(height / m) * m, math.ceil(width / m) * m

    def partition_size(self, height: int, width: int) -> Tuple[int, int]:
        """Window size / grid cell count (tokens per axis) used for an input of this size."""
        hp, wp = self.padded_size(height, width)
        return hp // self.pad_multiple, wp // self.pad_multiple

    # -- recurrent forward ------------------------------------------------------------------------

    def forward_features(
        self, x: torch.Tensor, prev_states: States = None
    ) -> Tuple[Dict[str, torch.Tensor], List[State]]:
        """One time step.

        Args:
            x: [B, in_chans, H, W]; zero-padded bottom / right to ``padded_size(H, W)``.
            prev_states: four ``(h, c)`` pairs from the previous step, or None (zero state; a
                single None entry zeroes that stage only).

        Returns:
            ``({'stage1': [B, C1, H_pad / s1, W_pad / s1], ..., 'stage4': ...}, states)``.
        """
        if x.ndim != 4:
            raise ValueError(f"expected [B, C, H, W], got shape {tuple(x.shape)} (use forward_clip for clips)")
        H, W = x.shape[-2:]
        hp, wp = self.padded_size(H, W)
        if (hp, wp) != (H, W):
            x = F.pad(x, (0, wp - W, 0, hp - H))
        partition = (hp // self.pad_multiple, wp // self.pad_multiple)
        if prev_states is None:
            prev_states = [None] * len(self.stages)
        if len(prev_states) != len(self.stages):
            raise ValueError(f"prev_states has {len(prev_states)} entries, expected {len(self.stages)}")
        features: Dict[str, torch.Tensor] = {}
        states: List[State] = []
        for info, stage, prev in zip(self.feature_info, self.stages, prev_states):
            x, state = stage(x, partition, prev)
            features[info.name] = x
            states.append(state)
        return features, states

    def forward(self, x: torch.Tensor, prev_states: States = None) -> Tuple[Dict[str, torch.Tensor], List[State]]:
        """One time step: :meth:`forward_features`."""
        return self.forward_features(x, prev_states)

    def forward_clip(
        self,
        clip: torch.Tensor,
        prev_states: States = None,
        *,
        return_all: bool = True,
        valid: Optional[torch.Tensor] = None,
        is_first: Optional[torch.Tensor] = None,
    ) -> Tuple[Dict[str, torch.Tensor], States]:
        """Run a clip step by step, carrying the state, with per-sample sequence starts and padding.

        Args:
            clip: [B, T, in_chans, H, W].
            prev_states: state after the previous clip (e.g. the last batch of a stream), or None.
            return_all: True: every step's features, ``{name: [B, T, C, H_s, W_s]}``; False: only
                the last step's, ``{name: [B, C, H_s, W_s]}``.
            valid: bool [B, T], or None (all valid). A step that is not valid for a sample (front
                padding of a short clip) leaves that sample's state untouched and gives it zero
                features; a step valid for no sample is not run.
            is_first: bool [B] (a sample's sequence starts at step 0) or [B, T] (starts at step t):
                that sample's state is zeroed before the step.

        Returns:
            ``(features, states)`` with the states after the last step (detach them with
            :meth:`detach_states` before carrying them into the next optimisation step).
        """
        if clip.ndim != 5:
            raise ValueError(f"expected a clip [B, T, C, H, W], got shape {tuple(clip.shape)}")
        B, T = clip.shape[:2]
        starts = self._clip_mask(is_first, "is_first", B, T, clip.device, per_sample_ok=True)
        valid = self._clip_mask(valid, "valid", B, T, clip.device, per_sample_ok=False)
        states = prev_states
        steps: List[Dict[str, torch.Tensor]] = []
        feats: Optional[Dict[str, torch.Tensor]] = None
        for t in range(T):
            if starts is not None:
                states = self.reset_states(states, starts[:, t])
            keep = return_all or t == T - 1
            if valid is not None and not bool(valid[:, t].any()):
                feats = self._zero_features(clip) if keep else None
            else:
                feats, new_states = self(clip[:, t], states)
                if valid is not None and not bool(valid[:, t].all()):
                    new_states = self._keep_where_invalid(states, new_states, valid[:, t])
                    if keep:
                        mask = valid[:, t].view(-1, 1, 1, 1)
                        feats = {n: torch.where(mask, f, torch.zeros_like(f)) for n, f in feats.items()}
                states = new_states
            if return_all:
                steps.append(feats)
        if return_all:
            feats = {n: torch.stack([step[n] for step in steps], dim=1) for n in steps[0]}
        return feats, states

    @staticmethod
    def _clip_mask(mask, name: str, B: int, T: int, device, per_sample_ok: bool) -> Optional[torch.Tensor]:
        """A bool [B, T] mask (None stays None); a [B] ``is_first`` marks step 0."""
        if mask is None:
            return None
        mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
        if per_sample_ok and mask.shape == (B,):
            mask = torch.cat([mask[:, None], mask.new_zeros(B, T - 1)], dim=1)
        if mask.shape != (B, T):
            want = f"[{B}] or [{B}, {T}]" if per_sample_ok else f"[{B}, {T}]"
            raise ValueError(f"{name} must be {want} (B, T of the clip), got {tuple(mask.shape)}")
        return mask

    def _zero_features(self, clip: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The maps of one step, all zeros (a step valid for no sample)."""
        hp, wp = self.padded_size(*clip.shape[-2:])
        return {
            info.name: clip.new_zeros(clip.shape[0], info.channels, hp // info.stride, wp // info.stride)
            for info in self.feature_info
        }

    @staticmethod
    def _keep_where_invalid(old: States, new: Sequence[State], valid: torch.Tensor) -> List[State]:
        """``new`` states for the valid samples, ``old`` (zero where there is none yet) for the others."""
        keep = valid.view(-1, 1, 1, 1)
        out = []
        for s, (h, c) in enumerate(new):
            h0, c0 = (torch.zeros_like(h), torch.zeros_like(c)) if old is None or old[s] is None else old[s]
            out.append((torch.where(keep, h, h0), torch.where(keep, c, c0)))
        return out

    @staticmethod
    def reset_states(states: States, reset: torch.Tensor) -> Optional[List[Optional[State]]]:
        """Zero the state of the samples where ``reset`` (bool [B]) is True; others untouched."""
        if states is None:
            return None
        out: List[Optional[State]] = []
        for state in states:
            if state is None:
                out.append(None)
                continue
            mask = reset.to(device=state[0].device, dtype=torch.bool).view(-1, 1, 1, 1)
            out.append(tuple(torch.where(mask, torch.zeros_like(t), t) for t in state))
        return out

    @staticmethod
    def detach_states(states: States) -> Optional[List[Optional[State]]]:
        """States without their graph (RVT detaches them between training batches)."""
        if states is None:
            return None
        return [None if s is None else (s[0].detach(), s[1].detach()) for s in states]


MaxVitRnn = MaxViTRNN  # the earlier spelling of the class name, kept as an alias


# ------------------------------------------------------------------------------------------------
# variants

MAXVIT_RNN_VARIANTS: Dict[str, dict] = {
    # RVT's published sizes (config/experiment/gen*/{tiny,small,default}.yaml); heads = dims / dim_head
    "tiny": dict(embed_dim=32, dim_head=32),  # dims 32/64/128/256, heads 1/2/4/8
    "small": dict(embed_dim=48, dim_head=24),  # dims 48/96/192/384, heads 2/4/8/16
    "base": dict(embed_dim=64, dim_head=32),  # dims 64/128/256/512, heads 2/4/8/16
}


# ------------------------------------------------------------------------------------------------
# checkpoints

RVT_BACKBONE_PREFIX = "mdl.backbone."
_STEM_KEY = "stages.0.downsample_cf2cl.conv.weight"
_STAGE_KEY = re.compile(r"stages\.(\d+)\.")
_BLOCK_KEY = re.compile(r"stages\.(\d+)\.att_blocks\.(\d+)\.")
_LIGHTNING_META = ("epoch", "global_step", "pytorch-lightning_version")


@dataclass
class RVTCheckpointReport:
    """What :func:`load_rvt_checkpoint` found and did.

    Attributes:
        path: the file.
        loaded: number of backbone tensors loaded into the model.
        ignored: non-backbone key prefixes and their counts, e.g. ``{'mdl.fpn.': 98}``.
        stem: ``'loaded'`` or a sentence saying how the stem conv was re-initialised.
        meta: Lightning metadata found beside the weights (epoch, global_step, version).
    """

    path: str
    loaded: int = 0
    ignored: Dict[str, int] = field(default_factory=dict)
    stem: str = "loaded"
    meta: Dict[str, object] = field(default_factory=dict)

    def __str__(self) -> str:
        ignored = ", ".join(f"{k}* ({n})" for k, n in self.ignored.items()) or "nothing"
        return f"{self.path}: loaded {self.loaded} backbone tensors; ignored {ignored}; stem {self.stem}"


def _ignored_prefix(key: str) -> str:
    parts = key.split(".")
    depth = 2 if parts[0] == "mdl" and len(parts) > 2 else 1
    return ".".join(parts[:depth]) + "."


def convert_rvt_to_maxvit_rnn(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """RVT detector state dict -> (:class:`MaxViTRNN` state dict, ignored prefixes with counts).

    Pure function. Accepts the Lightning module's keys (``mdl.backbone.*``), the detector's
    (``backbone.*``) or already stripped ones (``stages.*``); ``fpn`` / ``yolox_head`` keys are
    counted per prefix and left out.
    """
    for prefix in (RVT_BACKBONE_PREFIX, "backbone.", ""):
        backbone = {
            k[len(prefix) :]: v
            for k, v in state_dict.items()
            if k.startswith(prefix) and k[len(prefix) :].startswith("stages.")
        }
        if backbone:
            ignored = Counter(
                _ignored_prefix(k)
                for k in state_dict
                if not (k.startswith(prefix) and k[len(prefix) :].startswith("stages."))
            )
            return backbone, dict(sorted(ignored.items()))
    return {}, dict(sorted(Counter(_ignored_prefix(k) for k in state_dict).items()))


def rvt_backbone_architecture(state_dict: Dict[str, torch.Tensor]) -> dict:
    """Sizes readable off a (stripped) backbone state dict: in_chans, patch_size, stage_dims,
    depths, mlp_hidden. ``dim_head`` is not (qkv is ``3C x C`` for any head count)."""
    arch: dict = {}
    stem = state_dict.get(_STEM_KEY)
    if stem is not None and stem.ndim == 4:
        arch.update(in_chans=int(stem.shape[1]), patch_size=(int(stem.shape[-1]) + 1) // 2)
    stages = sorted({int(m.group(1)) for m in map(_STAGE_KEY.match, state_dict) if m})
    dims, depths, hidden = [], [], []
    for s in stages:
        conv = state_dict.get(f"stages.{s}.downsample_cf2cl.conv.weight")
        dims.append(int(conv.shape[0]) if conv is not None else None)
        blocks = {int(m.group(2)) for m in map(_BLOCK_KEY.match, state_dict) if m and int(m.group(1)) == s}
        depths.append(max(blocks) + 1 if blocks else 0)
        fc1 = state_dict.get(f"stages.{s}.att_blocks.0.att_window.mlp.net.0.0.weight")
        hidden.append(int(fc1.shape[0]) if fc1 is not None else None)
    arch.update(stage_dims=tuple(dims), depths=tuple(depths), mlp_hidden=tuple(hidden))
    return arch


def _describe(arch: dict) -> str:
    return (
        f"in_chans {arch.get('in_chans')}, patch {arch.get('patch_size')}, stage dims "
        f"{arch.get('stage_dims')}, block pairs {arch.get('depths')}, mlp hidden {arch.get('mlp_hidden')}"
    )


def _suggest(arch: dict) -> str:
    dims = arch.get("stage_dims") or (None,)
    variant = {v["embed_dim"]: name for name, v in MAXVIT_RNN_VARIANTS.items()}.get(dims[0])
    if variant is None:
        return f"build MaxViTRNN(embed_dim={dims[0]}, in_chans={arch.get('in_chans')}, ...) to match it"
    return (
        f"build it with maxvit_rnn_{variant}(in_chans={arch.get('in_chans')}, "
        f"patch_size=...) (RVT-{variant[0].upper()} sizes)"
    )


def with_lightning_prefix(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """RVT keys as the Lightning module holds them: detector-level keys (``backbone.*``, ``fpn.*``,
    ``yolox_head.*``) get ``mdl.``; keys that have it stay."""
    if any(k.startswith("mdl.") for k in state_dict):
        return dict(state_dict)
    return {f"mdl.{k}": v for k, v in state_dict.items()}


def read_rvt_checkpoint(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """``(state_dict, Lightning metadata)`` of an RVT file, read weights-only.

    The file is a Lightning checkpoint (``{'state_dict': {'mdl.backbone.*', 'mdl.fpn.*',
    'mdl.yolox_head.*'}, 'epoch', ...}``: plain containers, numbers and strings, so no allow-list) or
    a bare state dict. One reader for every part of an RVT checkpoint (backbone, PAFPN).
    """
    path = os.fspath(path)
    unsafe_fix = (
        "Lightning files written by old torch versions can hold optimizer / scheduler objects. Fix: in "
        "a trusted environment re-save only the weights: torch.save({'state_dict': "
        f"torch.load({path!r}, weights_only=False)['state_dict']}}, 'rvt_weights.ckpt'), and load that file"
    )
    obj = read_checkpoint(
        path,
        what="RVT checkpoint",
        unsafe_fix=unsafe_fix,
        missing_fix="Put the official RVT weights (e.g. rvt-t.ckpt / rvt-s.ckpt / rvt-b.ckpt) "
        "there, or build the model without a checkpoint",
    )
    state_dict = find_state_dict(obj, path=path, what="RVT state dict", wrappers=("state_dict",), strip_prefix=None)
    wrapped = isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)
    meta = {k: obj[k] for k in _LIGHTNING_META if k in obj} if wrapped else {}
    return state_dict, meta


def load_rvt_checkpoint(model: MaxViTRNN, path, stem_mismatch: str = "reinit") -> RVTCheckpointReport:
    """Load the backbone of an RVT checkpoint (:func:`read_rvt_checkpoint`) into ``model``, strictly.

    Keys are stripped of ``mdl.backbone.``; the neck / head keys are counted and ignored.

    Args:
        model: the backbone to fill.
        path: the checkpoint file, or a state dict already read by :func:`read_rvt_checkpoint`.
        stem_mismatch: when the checkpoint's stem patch differs from the model's (a patch-4 RVT
            checkpoint in a patch-2 model): ``'reinit'`` re-initialises the stem conv (only that
            tensor; the stem LayerNorm and everything else load) with one log line; ``'error'``
            raises.

    Returns:
        :class:`RVTCheckpointReport` (also logged).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a safely loadable RVT checkpoint, or an architecture that does not match.
    """
    if stem_mismatch not in ("reinit", "error"):
        raise ValueError(f"stem_mismatch must be 'reinit' or 'error', got {stem_mismatch!r}")
    if isinstance(path, Mapping):
        state_dict, meta, path = dict(path), {}, "state dict"
    else:
        path = os.fspath(path)
        state_dict, meta = read_rvt_checkpoint(path)
    backbone, ignored = convert_rvt_to_maxvit_rnn(state_dict)
    if not backbone:
        raise ValueError(
            f"{path} holds no RVT backbone weights (no '{RVT_BACKBONE_PREFIX}stages.*' keys; "
            f"found prefixes {ignored}). Fix: point to an RVT detector checkpoint"
        )
    report = RVTCheckpointReport(path=path, ignored=ignored, meta=meta)

    found, want = rvt_backbone_architecture(backbone), rvt_backbone_architecture(model.state_dict())
    differs = [k for k in ("in_chans", "stage_dims", "depths", "mlp_hidden") if found.get(k) != want.get(k)]
    if differs:
        raise ValueError(
            f"{path} does not fit this MaxViTRNN: the checkpoint has {_describe(found)}; the model "
            f"has {_describe(want)} (differs in {', '.join(differs)}). Fix: {_suggest(found)}"
        )

    if found.get("patch_size") != want.get("patch_size"):
        what = (
            f"stem conv is {backbone[_STEM_KEY].shape[-1]}x{backbone[_STEM_KEY].shape[-1]} "
            f"(patch {found.get('patch_size')}) in the checkpoint but {2 * model.patch_size - 1}x"
            f"{2 * model.patch_size - 1} (patch {model.patch_size}) in the model"
        )
        if stem_mismatch == "error":
            raise ValueError(
                f"{path}: {what}. Fix: build the model with patch_size={found.get('patch_size')}, "
                f"or load with stem_mismatch='reinit'"
            )
        stem_conv = model.stages[0].downsample_cf2cl.conv
        stem_conv.reset_parameters()  # a fresh init, not whatever the model held before
        backbone[_STEM_KEY] = stem_conv.weight.detach().clone()
        report.stem = f"re-initialised ({what})"
        logger.warning(
            "%s: %s; re-initialised %s, loaded the other %d backbone tensors unchanged",
            path,
            what,
            _STEM_KEY,
            len(backbone) - 1,
        )

    try:
        model.load_state_dict(backbone, strict=True)
    except RuntimeError as e:  # e.g. a norm1 where this layout has none: not an RVT MaxViT-RNN
        detail = " ".join(str(e).split())
        raise ValueError(
            f"{path} does not load strictly into MaxViTRNN ({detail}). Fix: point to an RVT "
            f"MaxViT-RNN checkpoint, or build the model with the checkpoint's sizes"
        ) from e
    # a re-initialised stem conv was not loaded from the file
    report.loaded = len(backbone) - (0 if report.stem == "loaded" else 1)
    logger.info("%s", report)
    return report


# ------------------------------------------------------------------------------------------------
# factory functions


def create_maxvit_rnn(variant: str = "tiny", **kwargs) -> MaxViTRNN:
    """MaxViTRNN of a published size (``tiny`` / ``small`` / ``base``), any argument overridable."""
    if variant not in MAXVIT_RNN_VARIANTS:
        raise ValueError(f"unknown MaxViT-RNN variant {variant!r}; choose from {sorted(MAXVIT_RNN_VARIANTS)}")
    return MaxViTRNN(**{**MAXVIT_RNN_VARIANTS[variant], **kwargs})


def maxvit_rnn_tiny(**kwargs) -> MaxViTRNN:
    """RVT-T backbone: embed 32, dim_head 32."""
    return create_maxvit_rnn("tiny", **kwargs)


def maxvit_rnn_small(**kwargs) -> MaxViTRNN:
    """RVT-S backbone: embed 48, dim_head 24."""
    return create_maxvit_rnn("small", **kwargs)


def maxvit_rnn_base(**kwargs) -> MaxViTRNN:
    """RVT-B backbone: embed 64, dim_head 32."""
    return create_maxvit_rnn("base", **kwargs)
