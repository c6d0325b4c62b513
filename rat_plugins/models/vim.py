"""Vision Mamba (ViM) detection backbone with the bidirectional "v2" mixer.

Semantics follow the official implementation (see ``shared/formats.md`` section 7 for the facts
used): 16x16 patches, absolute position embedding, residual blocks of [RMSNorm -> bidirectional
Mamba mixer] with the residual kept in fp32, optional EVA-style 2D rotary embedding on the hidden
states and the residual, and a ``last_layer_process`` of 'none' / 'add' / 'add & norm'. Unlike the
official detection backbone it takes any input size and aspect ratio: the position embedding is
resized to the actual token grid at run time. Scans go through
:func:`rat_plugins.models.ops.selective_scan.selective_scan` (mamba-ssm's kernel on CUDA when
present, the project's C++ / PyTorch scan otherwise).
"""
import argparse
import logging
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .ops.selective_scan import selective_scan

__all__ = ["RMSNorm", "BiMambaMixer", "VimBackbone", "load_vim_checkpoint",
           "convert_vim_official_to_backbone", "vim_tiny_backbone", "vim_small_backbone", "vim_base_backbone"]

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (no bias), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba ("bimamba v2"): shared in/out projections, one scan per direction.

    Args:
        d_model: token width. d_state: SSM state size. d_conv: causal conv kernel.
        expand: inner width factor. dt_rank: rank of the delta projection (default ceil(d/16)).
        divide_out: average the two directions (official ``if_divide_out``) instead of summing.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank=None,
                 dt_min: float = 1e-3, dt_max: float = 0.1, divide_out: bool = True):
        super().__init__()
        inner = expand * d_model
        self.d_state, self.dt_rank, self.divide_out = d_state, dt_rank or math.ceil(d_model / 16), divide_out
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        for suffix in ("", "_b"):
            setattr(self, f"conv1d{suffix}", nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1))
            setattr(self, f"x_proj{suffix}", nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False))
            dt_proj = nn.Linear(self.dt_rank, inner, bias=True)
            # Official init: dt spread log-uniformly in [dt_min, dt_max], bias = softplus^-1(dt).
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            setattr(self, f"dt_proj{suffix}", dt_proj)
            a_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1)
            setattr(self, "A_log" if not suffix else "A_b_log", nn.Parameter(a_log))
            setattr(self, f"D{suffix}", nn.Parameter(torch.ones(inner)))
        self.out_proj = nn.Linear(inner, d_model, bias=False)

    def _direction(self, x, z, conv, x_proj, dt_proj, A_log, D):
        length = x.shape[-1]
        u = F.silu(conv(x)[..., :length])  # causal: left pad d_conv-1, keep the first L outputs
        dt, B, C = torch.split(x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.matmul(dt_proj.weight, dt.transpose(1, 2))  # bias goes in as delta_bias
        return selective_scan(u, delta, -torch.exp(A_log.float()), B.transpose(1, 2).contiguous(),
                              C.transpose(1, 2).contiguous(), D.float(), z=z, delta_bias=dt_proj.bias.float(),
                              delta_softplus=True)

    def forward(self, hidden):
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
        y_f = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        y_b = self._direction(x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b,
                              self.A_b_log, self.D_b).flip(-1)
        y = (y_f + y_b) / 2 if self.divide_out else y_f + y_b
        return self.out_proj(y.transpose(1, 2))


class _Block(nn.Module):
    """One residual block; keys ``layers.N.norm`` / ``layers.N.mixer`` as in official checkpoints."""

    def __init__(self, dim, drop_path: float, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)
        self.drop_path = drop_path

    def forward(self, hidden, residual):
        residual = hidden.float() if residual is None else residual + self._drop(hidden).float()
        return self.mixer(self.norm(residual.to(self.norm.weight.dtype))), residual

    def _drop(self, x):
        if not self.training or self.drop_path == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path
        return x * keep / (1 - self.drop_path)


def _rope_tables(grid_hw, dim, pt_grid, device):
    """EVA 2D rotary tables [H*W, dim]: half the channels rotate with the row, half with the column."""
    half = dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))
    parts = []
    for n, axis in zip(grid_hw, (0, 1)):
        t = torch.arange(n, device=device).float() / n * pt_grid
        f = torch.outer(t, freqs).repeat_interleave(2, dim=-1)  # [n, half]
        parts.append(f[:, None, :].expand(n, grid_hw[1], half) if axis == 0 else f[None].expand(grid_hw[0], n, half))
    angles = torch.cat(parts, dim=-1).reshape(-1, dim)
    return angles.cos(), angles.sin()


def _rotate_half(x):
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


class VimBackbone(nn.Module):
    """ViM feature extractor for detection: a stride-``patch_size`` map of ``embed_dim`` channels.

    Args:
        embed_dim, depth, patch_size: model size (tiny 192/24/16).
        pt_hw_seq_len: side of the pretraining token grid (14 for 224x224) that the stored position
            embedding and the rotary positions refer to.
        if_rope, if_rope_residual: rotary embedding on hidden states / the residual, every layer.
        last_layer_process: 'none' (hidden), 'add' (hidden + residual), 'add & norm' (then norm_f).
        drop_path_rate: stochastic depth, linear over depth.
        freeze: no gradients, eval mode kept after ``train()``, no autograd graph.
        checkpoint: official ViM checkpoint to load (see :meth:`load_official_checkpoint`).
        d_state, d_conv, expand: mixer sizes (16, 4, 2 as in the official models).
    """

    def __init__(self, embed_dim: int = 192, depth: int = 24, patch_size: int = 16, in_chans: int = 3,
                 pt_hw_seq_len: int = 14, if_rope: bool = True, if_rope_residual: bool = True,
                 last_layer_process: str = "add", drop_path_rate: float = 0.0, freeze: bool = False,
                 checkpoint=None, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        if last_layer_process not in ("none", "add", "add & norm"):
            raise ValueError(f"last_layer_process must be 'none', 'add' or 'add & norm', got {last_layer_process!r}")
        self.embed_dim, self.depth, self.patch_size, self.pt_hw_seq_len = embed_dim, depth, patch_size, pt_hw_seq_len
        self.if_rope, self.if_rope_residual, self.last_layer_process = if_rope, if_rope_residual, last_layer_process
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, pt_hw_seq_len ** 2, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.layers = nn.ModuleList(_Block(embed_dim, dpr[i], d_state=d_state, d_conv=d_conv, expand=expand)
                                    for i in range(depth))
        self.norm_f = RMSNorm(embed_dim)
        self.freeze = freeze
        if checkpoint:
            self.load_official_checkpoint(checkpoint)
        if freeze:
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True):
        return super().train(mode and not self.freeze)

    def _pos_embed(self, grid_hw):
        pos = self.pos_embed
        if tuple(grid_hw) == (self.pt_hw_seq_len, self.pt_hw_seq_len):
            return pos
        pos = pos.reshape(1, self.pt_hw_seq_len, self.pt_hw_seq_len, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos.float(), size=tuple(grid_hw), mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).flatten(1, 2).to(self.pos_embed.dtype)

    def forward(self, x):
        if self.freeze:
            with torch.no_grad():
                return self._forward(x)
        return self._forward(x)

    def _forward(self, x):
        pad_h, pad_w = (-x.shape[-2]) % self.patch_size, (-x.shape[-1]) % self.patch_size
        if pad_h or pad_w:  # bottom/right, so the map stays aligned with the image
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed.proj(x)
        grid_hw = x.shape[-2:]
        hidden = x.flatten(2).transpose(1, 2) + self._pos_embed(grid_hw)
        cos = sin = None
        if self.if_rope:
            cos, sin = _rope_tables(grid_hw, self.embed_dim, self.pt_hw_seq_len, x.device)
        residual = None
        for layer in self.layers:
            if self.if_rope:
                hidden = hidden * cos + _rotate_half(hidden) * sin
                if self.if_rope_residual and residual is not None:
                    residual = residual * cos + _rotate_half(residual) * sin
            hidden, residual = layer(hidden, residual)
        if self.last_layer_process == "none":
            out = hidden
        else:
            out = (residual + hidden.float()).to(hidden.dtype)
            if self.last_layer_process == "add & norm":
                out = self.norm_f(out)
        return out.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *grid_hw)

    def load_official_checkpoint(self, path) -> dict:
        """Load an official ViM checkpoint; log and return the missing / unexpected key report."""
        state, report = convert_vim_official_to_backbone(load_vim_checkpoint(path), self)
        result = self.load_state_dict(state, strict=False)
        report.update(missing=list(result.missing_keys), unexpected=list(result.unexpected_keys))
        logger.info("ViM checkpoint %s: dropped %s; missing %s; unexpected %s", path, report["dropped"],
                    report["missing"] or "none", report["unexpected"] or "none")
        return report


# DeiT-style training checkpoints hold these besides tensors (`args` is an argparse.Namespace).
_CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace]


def load_vim_checkpoint(path) -> "OrderedDict[str, torch.Tensor]":
    """The model state dict of an official ViM file (``{'model': ...}`` with extras, or bare)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ViM checkpoint not found: {path}. Put the official ViM weights there, "
                                f"or set model.backbone.net.checkpoint='' to start from random weights")
    try:
        with torch.serialization.safe_globals(_CHECKPOINT_SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a loadable ViM checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or "patch_embed.proj.weight" not in state:
        raise ValueError(f"{path} holds no ViM state dict (no 'patch_embed.proj.weight' key)")
    return state


def convert_vim_official_to_backbone(state_dict, backbone: VimBackbone):
    """Official classification keys -> :class:`VimBackbone` keys (pure; returns (state, report)).

    Drops the head, the cls token and rope buffers; removes the cls slot of ``pos_embed`` (for
    middle-cls-token models it sits at index M//2) and resizes the grid to the backbone's.
    """
    embed = state_dict["patch_embed.proj.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("layers."))
    if (embed, depth) != (backbone.embed_dim, backbone.depth):
        raise ValueError(f"checkpoint is a ViM with embed dim {embed} and depth {depth}, but the backbone "
                         f"has embed dim {backbone.embed_dim} and depth {backbone.depth}")
    out, dropped = OrderedDict(), []
    for k, v in state_dict.items():
        if k.startswith(("head.", "rope.")) or k == "cls_token":
            dropped.append(k)
        else:
            out[k] = v
    if "pos_embed" in out:
        pos = out["pos_embed"]
        n = pos.shape[1]
        side = math.isqrt(n)
        if side * side != n:  # one cls slot: middle-cls-token models put it at M//2
            m = n - 1
            side = math.isqrt(m)
            if side * side != m:
                raise ValueError(f"pos_embed with {n} entries is neither a square grid nor a grid plus a cls slot")
            pos = torch.cat([pos[:, : m // 2], pos[:, m // 2 + 1:]], dim=1)
            dropped.append("pos_embed[cls slot]")
        grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        target = backbone.pt_hw_seq_len
        if side != target:
            grid = F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False)
        out["pos_embed"] = grid.permute(0, 2, 3, 1).reshape(1, target * target, -1)
    return out, {"dropped": dropped}


def vim_tiny_backbone(**kwargs) -> VimBackbone:
    return VimBackbone(**{"embed_dim": 192, "depth": 24, **kwargs})


def vim_small_backbone(**kwargs) -> VimBackbone:
    return VimBackbone(**{"embed_dim": 384, "depth": 24, **kwargs})


def vim_base_backbone(**kwargs) -> VimBackbone:
    return VimBackbone(**{"embed_dim": 768, "depth": 24, **kwargs})
