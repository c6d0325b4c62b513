"""Vision Mamba (ViM): the classification model with the official key layout, and a detection
backbone for any input size.

Paper: Zhu et al., "Vision Mamba: Efficient Visual Representation Learning with Bidirectional
State Space Model", ICML 2024; official code: github.com/hustvl/Vim. Plain PyTorch: the scans run
through :func:`rat_plugins.models.ops.selective_scan.selective_scan` (mamba-ssm's CUDA kernel when
installed, a C++ / PyTorch CPU scan otherwise). :class:`VisionMamba` has exactly the official
state-dict keys, so official checkpoints load strictly; :class:`VimBackbone` is the official
detection backbone, padded to any size and aspect ratio. Checkpoint layout: docs/formats.md, ViM
checkpoints.
"""

import argparse
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, lecun_normal_, resample_abs_pos_embed, to_2tuple, trunc_normal_

from ..utils.checkpoint_io import find_state_dict, read_checkpoint
from .checkpointing import GradCheckpointing, run_block
from .features import FeatureInfo
from .ops.bimamba_fused import FusedBiMambaCPU, FusedBiMambaTriton
from .ops.selective_scan import selective_scan

__all__ = [
    "RMSNorm",
    "BiMambaV2",
    "Block",
    "PatchEmbed",
    "RotaryEmbedding2D",
    "VisionMamba",
    "VimBackbone",
    "VimConversionReport",
    "rope_cos_sin",
    "load_vim_checkpoint",
    "convert_vim_official_to_backbone",
    "checkpoint_filter_fn",
    "vim_tiny",
    "vim_small",
    "vim_base",
    "vim_tiny_backbone",
    "vim_small_backbone",
    "vim_base_backbone",
]

logger = logging.getLogger(__name__)

LAST_LAYER_PROCESSES = ("none", "add", "add & norm")
FEATURE_NAME = "last_feat"  # detectron2 ViTDet's name for the single map SimpleFeaturePyramid reads
_warned_freeze_alias = False


def _frozen_from_alias(frozen: bool, freeze: Optional[bool]) -> bool:
    """``frozen``, or the deprecated ``freeze`` when given (warns once per process)."""
    global _warned_freeze_alias
    if freeze is None:
        return bool(frozen)
    if frozen and not freeze:
        raise ValueError("VimBackbone: got frozen=True and freeze=False; pass only frozen")
    if not _warned_freeze_alias:
        _warned_freeze_alias = True
        warnings.warn(
            "VimBackbone: `freeze` is deprecated, use `frozen` (the same switch)", FutureWarning, stacklevel=3
        )
    return bool(freeze)


# ------------------------------------------------------------------------------------------------
# blocks


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """EVA rotary helper: adjacent pairs (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rope_cos_sin(
    grid_h: int, grid_w: int, embed_dim: int, pt_seq_len: int, theta: float = 10000.0, device=None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos / sin tables [grid_h * grid_w, embed_dim] of the official 2D rope (row-major tokens).

    Per axis ``embed_dim // 2`` channels with frequencies ``1 / theta^(2i / (embed_dim // 2))``,
    each repeated twice; positions ``arange(n) / n * pt_seq_len`` computed separately for rows
    and columns; row part then column part. For a square grid this is exactly the official
    ``VisionRotaryEmbeddingFast(dim=embed_dim // 2, pt_seq_len, ft_seq_len=n)``.
    """
    if embed_dim % 4:
        raise ValueError(f"rope needs embed_dim divisible by 4, got {embed_dim}")
    dim = embed_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))

    def axis(n: int) -> torch.Tensor:
        t = torch.arange(n, device=device) / n * pt_seq_len
        return torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # [n, dim]

    fh, fw = axis(grid_h), axis(grid_w)
    f = torch.cat([fh[:, None, :].expand(grid_h, grid_w, dim), fw[None, :, :].expand(grid_h, grid_w, dim)], -1)
    f = f.reshape(grid_h * grid_w, embed_dim)
    return f.cos(), f.sin()


class RotaryEmbedding2D(nn.Module):
    """The official ``VisionRotaryEmbeddingFast`` of ViM (buffers ``freqs_cos`` / ``freqs_sin``).

    Applied to the hidden states (not to queries / keys): ``x * cos + rotate_half(x) * sin``.
    As in the official code, an odd-length sequence (cls token + even grid) leaves token 0
    unrotated and rotates the others with the grid table (whatever the cls token position).
    """

    def __init__(self, embed_dim: int, grid_size: Tuple[int, int], pt_seq_len: int = 14, device=None):
        super().__init__()
        cos, sin = rope_cos_sin(grid_size[0], grid_size[1], embed_dim, pt_seq_len, device=device)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[1] % 2 != 0:
            rest = t[:, 1:, :]
            rest = rest * self.freqs_cos + rotate_half(rest) * self.freqs_sin
            return torch.cat((t[:, :1, :], rest), dim=1)
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


class BiMambaV2(nn.Module):
    """Bidirectional Mamba mixer ("bimamba v2") with the official parameter names.

    xz = in_proj(h); x, z = halves. Forward direction: u = silu(causal depthwise conv1d(x));
    dt, B, C = split(x_proj(u)); y_f = selective_scan(u, dt_proj.weight @ dt, -exp(A_log), B, C,
    D, z, delta_bias=dt_proj.bias, softplus). Backward direction: the same on token-reversed x and
    z with the ``_b`` parameters, reversed back. Output out_proj((y_f + y_b) / 2) (``/ 2`` only
    with ``if_divide_out``), times ``gamma`` with layer scale. Both directions run as one scan
    call with two groups of B / C.

    Without autograd on a CPU (a frozen backbone, inference), float32 and ``d_state`` 16, the
    mixer runs fused (:class:`rat_plugins.models.ops.bimamba_fused.FusedBiMambaCPU`); on CUDA with
    the ``triton`` scan backend always (:class:`~rat_plugins.models.ops.bimamba_fused.FusedBiMambaTriton`:
    both directions in one kernel launch, training included).

    Args:
        d_model: token width. d_state, d_conv, expand, dt_rank: SSM sizes (16, 4, 2, "auto" =
            ceil(d_model / 16)). dt_min, dt_max, dt_init, dt_scale, dt_init_floor: dt
            initialisation. conv_bias, bias: biases of conv1d / in_proj and out_proj.
        if_divide_out: average instead of sum the two directions. init_layer_scale: layer scale.
        use_fast_path: allow the fused paths (False: always the unfused computation).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: Optional[int] = None,
        if_divide_out: bool = True,
        init_layer_scale: Optional[float] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self.use_fast_path = use_fast_path  # as officially: False forces the unfused computation
        self.if_divide_out = if_divide_out
        self.init_layer_scale = init_layer_scale
        if init_layer_scale is not None:
            self.gamma = nn.Parameter(init_layer_scale * torch.ones(d_model, device=device))

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **fk)
        self.conv1d = self._conv(conv_bias, fk)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = self._dt_proj(dt_init, dt_scale, dt_min, dt_max, dt_init_floor, fk)
        self.A_log = nn.Parameter(self._a_log_init(device))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        # backward direction (registration order as in the official module)
        self.A_b_log = nn.Parameter(self._a_log_init(device))
        self.A_b_log._no_weight_decay = True
        self.conv1d_b = self._conv(conv_bias, fk)
        self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj_b = self._dt_proj(dt_init, dt_scale, dt_min, dt_max, dt_init_floor, fk)
        self.D_b = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D_b._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)
        self._fused_cpu = FusedBiMambaCPU()
        self._fused_triton = FusedBiMambaTriton()

    def _conv(self, conv_bias, fk):
        return nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=self.d_conv,
            groups=self.d_inner,
            padding=self.d_conv - 1,
            bias=conv_bias,
            **fk,
        )

    def _a_log_init(self, device):
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        return torch.log(A).repeat(self.d_inner, 1).contiguous()  # S4D-real, kept in fp32

    def _dt_proj(self, dt_init, dt_scale, dt_min, dt_max, dt_init_floor, fk):
        proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'constant' or 'random', got {dt_init!r}")
        dt = torch.exp(
            torch.rand(self.d_inner, device=fk["device"]) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        proj.bias._no_reinit = True
        return proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [batch, L, d_model] -> [batch, L, d_model]."""
        if self._fused_cpu.applies(self, hidden_states):
            return self._fused_cpu(self, hidden_states)
        if self._fused_triton.applies(self, hidden_states):
            return self._fused_triton(self, hidden_states)
        _, L, _ = hidden_states.shape
        xz = self.in_proj(hidden_states).transpose(1, 2)  # [b, 2 * d_inner, L]
        x, z = xz.chunk(2, dim=1)
        # both directions at once: channels [0, d_inner) forward, [d_inner, 2 d_inner) reversed
        x2 = torch.cat([x, x.flip(-1)], dim=1)
        z2 = torch.cat([z, z.flip(-1)], dim=1)
        w = torch.cat([self.conv1d.weight, self.conv1d_b.weight], 0)
        cb = None if self.conv1d.bias is None else torch.cat([self.conv1d.bias, self.conv1d_b.bias], 0)
        u = F.silu(F.conv1d(x2, w, cb, padding=self.d_conv - 1, groups=2 * self.d_inner)[..., :L])
        u_f, u_b = u.chunk(2, dim=1)
        dbl_f = self.x_proj(u_f.transpose(1, 2))  # [b, L, dt_rank + 2 state]
        dbl_b = self.x_proj_b(u_b.transpose(1, 2))
        sizes = [self.dt_rank, self.d_state, self.d_state]
        dt_f, B_f, C_f = dbl_f.split(sizes, dim=-1)
        dt_b, B_b, C_b = dbl_b.split(sizes, dim=-1)
        # computed as W @ dt^T: [b, 2 d_inner, L] comes out contiguous, as the scan reads it
        delta = torch.cat(
            [
                torch.matmul(self.dt_proj.weight, dt_f.transpose(1, 2)),
                torch.matmul(self.dt_proj_b.weight, dt_b.transpose(1, 2)),
            ],
            1,
        )
        Bm = torch.stack([B_f, B_b], dim=1).transpose(-1, -2)  # [b, 2, state, L]
        Cm = torch.stack([C_f, C_b], dim=1).transpose(-1, -2)
        A = -torch.exp(torch.cat([self.A_log, self.A_b_log], 0).float())
        y = selective_scan(
            u,
            delta,
            A,
            Bm,
            Cm,
            D=torch.cat([self.D, self.D_b]).float(),
            z=z2,
            delta_bias=torch.cat([self.dt_proj.bias, self.dt_proj_b.bias]).float(),
            delta_softplus=True,
        )
        y_f, y_b = y.chunk(2, dim=1)
        y = y_f + y_b.flip(-1)
        if self.if_divide_out:
            y = y / 2
        out = self.out_proj(y.transpose(1, 2))
        if self.init_layer_scale is not None:
            out = out * self.gamma
        return out


class Block(nn.Module):
    """Add -> norm -> mixer, returning (hidden_states, residual) as the official block.

    residual = hidden (first block) or residual + drop_path(hidden); hidden = mixer(norm(residual));
    the residual is kept in fp32 with ``residual_in_fp32``.
    """

    def __init__(
        self, dim: int, mixer: nn.Module, norm: nn.Module, drop_path: float = 0.0, residual_in_fp32: bool = True
    ):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.mixer = mixer
        self.norm = norm
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None):
        residual = hidden_states if residual is None else residual + self.drop_path(hidden_states)
        hidden_states = self.norm(residual.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        return self.mixer(hidden_states), residual


class PatchEmbed(nn.Module):
    """Conv patch embedding -> row-major tokens [batch, grid_h * grid_w, embed_dim].

    With ``img_size`` the input size is checked (classification model); with ``img_size=None``
    any size is accepted (backbone, which pads beforehand).
    """

    def __init__(
        self,
        img_size=224,
        patch_size: int = 16,
        stride: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.stride = stride
        self.img_size = to_2tuple(img_size) if img_size is not None else None
        if self.img_size is not None:
            self.grid_size = tuple((s - p) // stride + 1 for s, p in zip(self.img_size, self.patch_size))
            self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=stride, device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        if self.img_size is not None and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} does not match the model's img_size "
                f"{self.img_size} (build the model with img_size=... or use VimBackbone)"
            )
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


def _make_norm(dim, rms_norm, eps, device, dtype):
    if rms_norm:
        return RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    return nn.LayerNorm(dim, eps=eps, device=device, dtype=dtype)


def _make_layers(
    embed_dim,
    depth,
    d_state,
    ssm_cfg,
    norm_epsilon,
    rms_norm,
    residual_in_fp32,
    drop_path_rate,
    if_divide_out,
    init_layer_scale,
    device,
    dtype,
) -> nn.ModuleList:
    # official stochastic depth: layer i gets [0] + linspace(0, rate, depth) at index i
    dpr = [0.0] + [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
    ssm_cfg = dict(ssm_cfg or {})
    return nn.ModuleList(
        Block(
            embed_dim,
            BiMambaV2(
                embed_dim,
                d_state=d_state,
                layer_idx=i,
                if_divide_out=if_divide_out,
                init_layer_scale=init_layer_scale,
                device=device,
                dtype=dtype,
                **ssm_cfg,
            ),
            _make_norm(embed_dim, rms_norm, norm_epsilon, device, dtype),
            drop_path=dpr[i],
            residual_in_fp32=residual_in_fp32,
        )
        for i in range(depth)
    )


def _init_mamba_weights(
    module: nn.Module,
    n_layer: int,
    initializer_range: float = 0.02,
    rescale_prenorm_residual: bool = True,
    n_residuals_per_layer: int = 1,
):
    """The official ``_init_weights`` (GPT-2 style rescaled out_proj, zero Linear biases)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


def _segm_init_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Conv2d):
        lecun_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)


# ------------------------------------------------------------------------------------------------
# models


class VisionMamba(GradCheckpointing, nn.Module):
    """ViM classification model with the official constructor and state-dict keys.

    Args (official names; see hustvl/Vim ``models_mamba.py``):
        img_size, patch_size, stride, channels: input size (checked), patch conv.
        depth, embed_dim, d_state, ssm_cfg: layers and mixer sizes (``ssm_cfg`` goes to
            :class:`BiMambaV2`: d_conv, expand, dt_rank, ...).
        num_classes: head size (0: no head). drop_rate: dropout after the position embedding.
        drop_path_rate: stochastic depth (official schedule). norm_epsilon, rms_norm: norms.
        initializer_cfg: extra arguments of the official init. fused_add_norm: accepted, no effect
            on the numbers. residual_in_fp32: keep the residual stream in fp32.
        pt_hw_seq_len, if_rope, if_rope_residual: EVA-style rope on hidden (and residual) states
            before every layer. if_abs_pos_embed: learned position embedding.
        if_cls_token, use_middle_cls_token: cls token inserted at index M // 2 (middle) or 0.
        final_pool_type: 'none' (last token) | 'mean' | 'max' | 'all'; used only without a cls
            token, as in the official code.
        if_divide_out: average the two scan directions. init_layer_scale: layer scale gamma.
        if_bidirectional, flip_img_sequences_ratio, if_bimamba, bimamba_type,
            use_double_cls_token: only the official tiny / small / base settings (False, -1,
            False, 'v2', False) are implemented; anything else raises ValueError.

    ``forward_features`` returns, like the official code: with a cls token the final-normed cls
    token (``hidden[:, token_position]``) whatever ``final_pool_type`` says (so the official
    "final_pool_mean" checkpoints classify from the middle cls token, not from a mean); without
    one, the pooling named by ``final_pool_type``.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        stride=16,
        depth=24,
        embed_dim=192,
        d_state=16,
        channels=3,
        num_classes=1000,
        ssm_cfg=None,
        drop_rate=0.0,
        drop_path_rate=0.1,
        norm_epsilon: float = 1e-5,
        rms_norm: bool = True,
        initializer_cfg=None,
        fused_add_norm=True,
        residual_in_fp32=True,
        device=None,
        dtype=None,
        ft_seq_len=None,
        pt_hw_seq_len=14,
        if_bidirectional=False,
        final_pool_type="mean",
        if_abs_pos_embed=True,
        if_rope=False,
        if_rope_residual=False,
        flip_img_sequences_ratio=-1.0,
        if_bimamba=False,
        bimamba_type="v2",
        if_cls_token=True,
        if_divide_out=True,
        init_layer_scale=None,
        use_double_cls_token=False,
        use_middle_cls_token=True,
        **kwargs,
    ):
        super().__init__()
        unsupported = []
        if use_double_cls_token:
            unsupported.append("use_double_cls_token=True")
        if if_bidirectional:
            unsupported.append("if_bidirectional=True")
        if flip_img_sequences_ratio is not None and flip_img_sequences_ratio > 0:
            unsupported.append(f"flip_img_sequences_ratio={flip_img_sequences_ratio}")
        if if_bimamba or bimamba_type != "v2":
            unsupported.append(f"bimamba_type={'v1' if if_bimamba else bimamba_type!r} (only 'v2')")
        if unsupported:
            raise ValueError("VisionMamba: not implemented: " + ", ".join(unsupported))
        if final_pool_type not in ("none", "mean", "max", "all"):
            raise ValueError(f"final_pool_type must be 'none', 'mean', 'max' or 'all', got {final_pool_type!r}")
        ignored = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay")}
        if ignored:
            logger.warning("VisionMamba: ignoring unknown arguments %s", sorted(ignored))

        fk = {"device": device, "dtype": dtype}
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.final_pool_type = final_pool_type
        self.if_abs_pos_embed = if_abs_pos_embed
        self.if_rope = if_rope
        self.if_rope_residual = if_rope_residual
        self.if_cls_token = if_cls_token
        self.use_middle_cls_token = use_middle_cls_token
        self.num_tokens = 1 if if_cls_token else 0
        self.num_classes = num_classes
        self.d_model = self.num_features = self.embed_dim = embed_dim

        self.patch_embed = PatchEmbed(img_size, patch_size, stride, channels, embed_dim, **fk)
        num_patches = self.patch_embed.num_patches
        if if_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **fk))
        if if_abs_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim, **fk))
            self.pos_drop = nn.Dropout(p=drop_rate)
        if if_rope:
            self.rope = RotaryEmbedding2D(embed_dim, self.patch_embed.grid_size, pt_hw_seq_len, device=device)
        self.head = nn.Linear(embed_dim, num_classes, **fk) if num_classes > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.layers = _make_layers(
            embed_dim,
            depth,
            d_state,
            ssm_cfg,
            norm_epsilon,
            rms_norm,
            residual_in_fp32,
            drop_path_rate,
            if_divide_out,
            init_layer_scale,
            device,
            dtype,
        )
        self.norm_f = _make_norm(embed_dim, rms_norm, norm_epsilon, device, dtype)

        # official initialisation order
        self.patch_embed.apply(_segm_init_weights)
        self.head.apply(_segm_init_weights)
        if if_abs_pos_embed:
            trunc_normal_(self.pos_embed, std=0.02)
        if if_cls_token:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(lambda m: _init_mamba_weights(m, n_layer=depth, **(initializer_cfg or {})))

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "dist_token", "cls_token_head", "cls_token_tail"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.patch_embed(x)
        B, M, _ = x.shape
        token_position = None
        if self.if_cls_token:
            cls_token = self.cls_token.expand(B, -1, -1)
            token_position = M // 2 if self.use_middle_cls_token else 0
            x = torch.cat((x[:, :token_position], cls_token, x[:, token_position:]), dim=1)
        if self.if_abs_pos_embed:
            x = self.pos_drop(x + self.pos_embed)

        residual = None
        hidden_states = x
        for layer in self.layers:
            if self.if_rope:
                hidden_states = self.rope(hidden_states)
                if residual is not None and self.if_rope_residual:
                    residual = self.rope(residual)
            hidden_states, residual = run_block(layer, hidden_states, residual, enabled=self.grad_checkpointing)
        residual = hidden_states if residual is None else residual + self.drop_path(hidden_states)
        hidden_states = self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))

        if token_position is not None:
            return hidden_states[:, token_position, :]
        if self.final_pool_type == "none":
            return hidden_states[:, -1, :]
        if self.final_pool_type == "mean":
            return hidden_states.mean(dim=1)
        return hidden_states  # 'max' / 'all'

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = self.forward_features(x)
        if return_features:
            return x
        x = self.head(x)
        if self.final_pool_type == "max" and x.dim() == 3:
            x = x.max(dim=1)[0]
        return x


class VimBackbone(GradCheckpointing, nn.Module):
    """ViM detection backbone: one stride-``patch_size`` map [B, embed_dim, ceil(H/p), ceil(W/p)],
    named ``last_feat`` in :attr:`feature_info` and :meth:`forward_features`; ``forward`` returns it.

    The blocks of :class:`VisionMamba` without cls token; before every layer an EVA-style rope is
    applied to the hidden states (and the residual with ``if_rope_residual``), as in the official
    detection backbone. Unlike the official backbone it accepts any size / aspect ratio: the
    input is zero-padded bottom / right to a multiple of ``patch_size``, the position embedding
    (stored on the ``pt_hw_seq_len`` x ``pt_hw_seq_len`` pretraining grid) is resized bicubically
    to the actual grid at run time, and rope positions are ``arange(n) / n * pt_hw_seq_len`` per
    axis (identical to the official table for square grids; no token is skipped since there is
    no cls token).

    Args:
        embed_dim, depth, patch_size: sizes (ViM-tiny: 192, 24, 16).
        pt_hw_seq_len: pretraining grid (14 for 224x224) of the position embedding and the rope.
        if_rope, if_rope_residual: rope on hidden states / on the residual.
        last_layer_process: 'none' (last mixer output) | 'add' (+ residual) |
            'add & norm' (RMSNorm ``norm_f`` of the sum; ``norm_f`` exists in every variant, frozen
            and unused unless 'add & norm').
        drop_path_rate: stochastic depth (official schedule).
        frozen: no parameter trains, the module stays in eval mode after ``.train()`` and runs
            under ``torch.no_grad()``. ``freeze`` is its deprecated alias.
        checkpoint: official ViM checkpoint to load (see :meth:`load_official_checkpoint`).
        in_chans, d_state, ssm_cfg, norm_epsilon, rms_norm, residual_in_fp32, if_divide_out,
            if_abs_pos_embed, init_layer_scale: as in :class:`VisionMamba`.
        grad_checkpointing: recompute each layer's activations in the backward pass (less memory,
            one more forward); also ``set_grad_checkpointing()``.
    """

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 24,
        patch_size: int = 16,
        pt_hw_seq_len: int = 14,
        if_rope: bool = True,
        if_rope_residual: bool = True,
        last_layer_process: str = "add",
        drop_path_rate: float = 0.0,
        frozen: bool = False,
        checkpoint: Optional[str] = None,
        *,
        in_chans: int = 3,
        d_state: int = 16,
        ssm_cfg: Optional[dict] = None,
        norm_epsilon: float = 1e-5,
        rms_norm: bool = True,
        residual_in_fp32: bool = True,
        if_divide_out: bool = True,
        if_abs_pos_embed: bool = True,
        init_layer_scale: Optional[float] = None,
        freeze: Optional[bool] = None,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        frozen = _frozen_from_alias(frozen, freeze)
        self.grad_checkpointing = grad_checkpointing  # recompute each layer's activations in backward
        if last_layer_process not in LAST_LAYER_PROCESSES:
            raise ValueError(f"last_layer_process must be one of {LAST_LAYER_PROCESSES}, got {last_layer_process!r}")
        if if_rope and embed_dim % 4:
            raise ValueError(f"rope needs embed_dim divisible by 4, got {embed_dim}")
        self.embed_dim = embed_dim
        self.depth = depth
        self.patch_size = patch_size
        self.pt_hw_seq_len = pt_hw_seq_len
        self.pos_grid = (pt_hw_seq_len, pt_hw_seq_len)
        self.if_rope = if_rope
        self.if_rope_residual = if_rope_residual
        self.last_layer_process = last_layer_process
        self.if_abs_pos_embed = if_abs_pos_embed
        self.frozen = frozen
        self.feature_info = [FeatureInfo(FEATURE_NAME, patch_size, embed_dim)]

        self.patch_embed = PatchEmbed(None, patch_size, patch_size, in_chans, embed_dim)
        if if_abs_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, pt_hw_seq_len * pt_hw_seq_len, embed_dim))
        self.layers = _make_layers(
            embed_dim,
            depth,
            d_state,
            ssm_cfg,
            norm_epsilon,
            rms_norm,
            residual_in_fp32,
            drop_path_rate,
            if_divide_out,
            init_layer_scale,
            None,
            None,
        )
        # present in every variant so official checkpoints load without unexpected keys; used (and
        # trainable) only with 'add & norm', so DDP never sees an unused trainable parameter
        self.norm_f = _make_norm(embed_dim, rms_norm, norm_epsilon, None, None)
        if last_layer_process != "add & norm":
            self.norm_f.requires_grad_(False)
        self._rope_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

        self.patch_embed.apply(_segm_init_weights)
        if if_abs_pos_embed:
            trunc_normal_(self.pos_embed, std=0.02)
        self.apply(lambda m: _init_mamba_weights(m, n_layer=depth))

        if checkpoint:
            self.load_official_checkpoint(checkpoint)
        if frozen:
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True):
        return super().train(False if self.frozen else mode)

    def extra_repr(self) -> str:
        # the settings that change the output without changing a weight shape (also part of the
        # frozen-feature cache key)
        return (
            f"patch_size={self.patch_size}, pt_hw_seq_len={self.pt_hw_seq_len}, if_rope={self.if_rope}, "
            f"if_rope_residual={self.if_rope_residual}, last_layer_process={self.last_layer_process!r}, "
            f"if_abs_pos_embed={self.if_abs_pos_embed}, frozen={self.frozen}"
        )

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed"}

    def load_official_checkpoint(self, path: str) -> "VimConversionReport":
        """Load an official ViM file (non-strict; missing / unexpected keys are logged)."""
        state_dict = load_vim_checkpoint(path)
        converted, report = convert_vim_official_to_backbone(state_dict, self)
        result = self.load_state_dict(converted, strict=False)
        report.missing = list(result.missing_keys)
        report.unexpected = list(result.unexpected_keys)
        if report.missing or report.unexpected:
            logger.warning(
                "ViM checkpoint %s: missing keys %s; unexpected keys %s", path, report.missing, report.unexpected
            )
        logger.info("ViM checkpoint %s loaded: %s", path, report)
        return report

    def _pos_embed_for(self, grid: Tuple[int, int]) -> torch.Tensor:
        return _resample_grid(self.pos_embed, self.pos_grid, grid)

    def _rope_for(self, grid: Tuple[int, int], device) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (grid[0], grid[1], str(device))
        if key not in self._rope_cache:
            if len(self._rope_cache) > 32:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_cos_sin(grid[0], grid[1], self.embed_dim, self.pt_hw_seq_len, device=device)
        return self._rope_cache[key]

    def forward_features(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{"last_feat": map}``: the :attr:`feature_info` contract of :mod:`rat_plugins.models.features`."""
        return {FEATURE_NAME: self(x)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-``patch_size`` map [B, embed_dim, ceil(H / p), ceil(W / p)]."""
        if self.frozen:
            with torch.no_grad():
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        p = self.patch_size
        pad_h, pad_w = (-H) % p, (-W) % p
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x, grid = self.patch_embed(x)
        if self.if_abs_pos_embed:
            x = x + self._pos_embed_for(grid)
        cos, sin = self._rope_for(grid, x.device) if self.if_rope else (None, None)

        residual = None
        hidden_states = x
        for layer in self.layers:
            if self.if_rope:
                hidden_states = hidden_states * cos + rotate_half(hidden_states) * sin
                if residual is not None and self.if_rope_residual:
                    residual = residual * cos + rotate_half(residual) * sin
            hidden_states, residual = run_block(layer, hidden_states, residual, enabled=self.grad_checkpointing)

        if self.last_layer_process == "none" or residual is None:
            out = hidden_states
        elif self.last_layer_process == "add":
            out = hidden_states + residual
        else:
            out = self.norm_f((hidden_states + residual).to(self.norm_f.weight.dtype))
        return out.transpose(1, 2).reshape(B, self.embed_dim, grid[0], grid[1])


# ------------------------------------------------------------------------------------------------
# checkpoints

# What the official DeiT-style training files legitimately hold besides tensors and plain Python
# containers / numbers / strings: the argparse Namespace of the training script (``'args'``).
SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace]


@dataclass
class VimConversionReport:
    """What :func:`convert_vim_official_to_backbone` did, plus the load result."""

    dropped: List[str] = field(default_factory=list)
    pos_embed: str = "absent"
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def __getitem__(self, key: str):  # mapping-style access: report["dropped"]
        return getattr(self, key)

    def __str__(self) -> str:
        return (
            f"dropped {self.dropped}; pos_embed: {self.pos_embed}; missing {self.missing}; unexpected {self.unexpected}"
        )


def load_vim_checkpoint(path) -> Dict[str, torch.Tensor]:
    """State dict of an official ViM file: ``{'model': sd, 'optimizer', ..., 'args': Namespace}``,
    ``{'model': sd}``, ``{'state_dict': sd}`` or a bare state dict (see docs/formats.md, ViM checkpoints).

    Read with ``torch.load(weights_only=True)`` and :data:`SAFE_CHECKPOINT_GLOBALS` allowed. Raises
    FileNotFoundError for a missing file and ValueError for a file that is not a (safely loadable)
    ViM checkpoint.
    """
    obj = read_checkpoint(
        path,
        what="ViM checkpoint",
        allow=SAFE_CHECKPOINT_GLOBALS,
        missing_fix="Put the official ViM weights there, or set "
        "model.backbone.net.checkpoint='' to start from random weights",
        unsafe_fix="only tensors, plain containers and argparse.Namespace are allowed",
    )
    sd = find_state_dict(obj, path=path, what="ViM state dict")
    if "patch_embed.proj.weight" not in sd and not any(k.startswith("layers.") for k in sd):
        raise ValueError(
            f"{os.fspath(path)} holds a state dict without ViM keys (patch_embed.proj.weight, "
            f"layers.*); first keys: {sorted(sd)[:10]}"
        )
    return sd


def _isqrt_exact(n: int) -> Optional[int]:
    r = math.isqrt(n) if n >= 0 else -1
    return r if r >= 0 and r * r == n else None


def _split_pos_embed(pe: torch.Tensor, cls_token_position: str) -> Tuple[torch.Tensor, int, str]:
    """Patch part of an official pos_embed [1, M(+1), C] -> ([1, M, C], grid side, description)."""
    P = pe.shape[1]
    side = _isqrt_exact(P)
    if side is not None:
        return pe, side, f"{P} entries = {side}x{side} grid, no cls slot"
    side = _isqrt_exact(P - 1)
    if side is None:
        raise ValueError(f"pos_embed has {P} entries: neither a square grid nor a square grid + 1 cls slot")
    M = P - 1
    idx = M // 2 if cls_token_position == "middle" else 0
    patches = torch.cat([pe[:, :idx], pe[:, idx + 1 :]], dim=1)
    return patches, side, f"removed the cls slot at index {idx} of {P} ({cls_token_position} cls token)"


def _resample_grid(pe: torch.Tensor, src: Tuple[int, int], dst: Tuple[int, int]) -> torch.Tensor:
    """Patch position table [1, src_h * src_w, C] -> [1, dst_h * dst_w, C], bicubic without
    antialiasing as the official ViM code resizes it (timm's resampler antialiases by default)."""
    return resample_abs_pos_embed(pe, new_size=list(dst), old_size=list(src), num_prefix_tokens=0, antialias=False)


def _checkpoint_dims(state_dict) -> Tuple[Optional[int], int]:
    if "patch_embed.proj.weight" in state_dict:
        dim = state_dict["patch_embed.proj.weight"].shape[0]
    elif "pos_embed" in state_dict:
        dim = state_dict["pos_embed"].shape[-1]
    else:
        dim = None
    ids = {int(k.split(".")[1]) for k in state_dict if k.startswith("layers.") and k.split(".")[1].isdigit()}
    return dim, (max(ids) + 1 if ids else 0)


def convert_vim_official_to_backbone(
    state_dict: Dict[str, torch.Tensor], backbone: "VimBackbone", cls_token_position: str = "middle"
) -> Tuple[Dict[str, torch.Tensor], VimConversionReport]:
    """Official ViM classification state dict -> :class:`VimBackbone` state dict (pure function).

    Drops ``head.*``, cls tokens, ``rope.*`` buffers (the backbone computes rope per input) and
    ``norm_f.*`` when the backbone has no final norm. ``pos_embed``: a [1, M + 1, C] table has a
    cls slot, at index M // 2 for the official middle-cls-token models (``cls_token_position=
    'middle'``) or 0 (``'first'``), which is removed; a [1, M, C] table (M a square) has none. The
    patch grid is then resized (bicubic) to the backbone's stored grid. A checkpoint whose embed
    dim or depth differs from the backbone's raises ValueError naming both; other shape
    mismatches too.
    """
    if cls_token_position not in ("middle", "first"):
        raise ValueError(f"cls_token_position must be 'middle' or 'first', got {cls_token_position!r}")
    dim, depth = _checkpoint_dims(state_dict)
    if dim != backbone.embed_dim or depth != backbone.depth:
        raise ValueError(
            f"checkpoint is a ViM with embed dim {dim} and depth {depth}, but the backbone "
            f"has embed dim {backbone.embed_dim} and depth {backbone.depth}"
        )
    own = backbone.state_dict()
    report = VimConversionReport()
    out = {}
    for k, v in state_dict.items():
        drop = (
            k.startswith("head.")
            or k.startswith("rope.")
            or k in ("cls_token", "cls_token_head", "cls_token_tail", "dist_token")
            or (k.startswith("norm_f.") and not any(o.startswith("norm_f.") for o in own))
        )
        if drop:
            report.dropped.append(k)
        else:
            out[k] = v
    if "pos_embed" in out:
        patches, side, desc = _split_pos_embed(out["pos_embed"], cls_token_position)
        if patches.shape[1] != out["pos_embed"].shape[1]:
            report.dropped.append("pos_embed[cls slot]")
        grid = getattr(backbone, "pos_grid", (side, side))
        out["pos_embed"] = _resample_grid(patches, (side, side), grid)
        report.pos_embed = desc + (
            f"; resized {side}x{side} -> {grid[0]}x{grid[1]}"
            if (side, side) != tuple(grid)
            else f"; kept {side}x{side}"
        )
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs backbone {tuple(own[k].shape)}"
        for k, v in out.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise ValueError("ViM checkpoint does not fit the backbone: " + "; ".join(bad))
    return out, report


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionMamba) -> Dict[str, torch.Tensor]:
    """Official ViM checkpoint -> ``model`` (timm style): unwraps ``{'model': ...}``, resizes the
    position embedding to the model's grid keeping the cls slot at the model's cls position, and
    takes the rope tables from the model (they depend only on its grid)."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    out = dict(state_dict)
    own = model.state_dict()
    if "pos_embed" in out and "pos_embed" in own and out["pos_embed"].shape != own["pos_embed"].shape:
        patches, side, _ = _split_pos_embed(out["pos_embed"], "middle")
        has_cls = patches.shape[1] != out["pos_embed"].shape[1]
        cls = out["pos_embed"][:, patches.shape[1] // 2 : patches.shape[1] // 2 + 1] if has_cls else None
        patches = _resample_grid(patches, (side, side), model.patch_embed.grid_size)
        if model.if_cls_token:
            if cls is None:
                cls = own["pos_embed"][:, :1]
            M = patches.shape[1]
            pos = M // 2 if model.use_middle_cls_token else 0
            patches = torch.cat([patches[:, :pos], cls, patches[:, pos:]], dim=1)
        out["pos_embed"] = patches
    for k in ("rope.freqs_cos", "rope.freqs_sin"):
        if k in own:
            out[k] = own[k]
        else:
            out.pop(k, None)
    return out


# ------------------------------------------------------------------------------------------------
# factory functions

_OFFICIAL_CFG = dict(
    patch_size=16,
    depth=24,
    rms_norm=True,
    residual_in_fp32=True,
    fused_add_norm=True,
    final_pool_type="mean",
    if_abs_pos_embed=True,
    if_rope=False,
    if_rope_residual=False,
    bimamba_type="v2",
    if_cls_token=True,
    if_divide_out=True,
    use_middle_cls_token=True,
)


def vim_tiny(**kwargs) -> VisionMamba:
    """ViM-tiny (official ``vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``)."""
    return VisionMamba(**{**_OFFICIAL_CFG, "embed_dim": 192, **kwargs})


def vim_small(**kwargs) -> VisionMamba:
    """ViM-small (embed 384, depth 24)."""
    return VisionMamba(**{**_OFFICIAL_CFG, "embed_dim": 384, **kwargs})


def vim_base(**kwargs) -> VisionMamba:
    """ViM-base (embed 768, depth 24)."""
    return VisionMamba(**{**_OFFICIAL_CFG, "embed_dim": 768, **kwargs})


def vim_tiny_backbone(**kwargs) -> VimBackbone:
    """ViM-tiny detection backbone (embed 192, depth 24, stride 16)."""
    return VimBackbone(**{"embed_dim": 192, "depth": 24, **kwargs})


def vim_small_backbone(**kwargs) -> VimBackbone:
    """ViM-small detection backbone (embed 384, depth 24, stride 16)."""
    return VimBackbone(**{"embed_dim": 384, "depth": 24, **kwargs})


def vim_base_backbone(**kwargs) -> VimBackbone:
    """ViM-base detection backbone (embed 768, depth 24, stride 16)."""
    return VimBackbone(**{"embed_dim": 768, "depth": 24, **kwargs})
