"""ViT checkpoints in timm / DeiT layout -> mmseg's ``VisionTransformer`` naming (pure PyTorch).

The key mapping is the one of mmseg's ``tools/model_converters/vit2mmseg.py``, checked against
``mmseg/models/backbones/vit.py`` and mmcv's ``MultiheadAttention`` / ``FFN``:

=====================================  ===============================================
timm / DeiT                            mmseg ``VisionTransformer``
=====================================  ===============================================
``cls_token``, ``pos_embed``           unchanged (``pos_embed`` resized to the grid)
``patch_embed.proj.{weight,bias}``     ``patch_embed.projection.*`` (needs ``patch_bias=True``)
``blocks.i.norm1`` / ``norm2``         ``layers.i.ln1`` / ``ln2``
``blocks.i.attn.qkv.{weight,bias}``    ``layers.i.attn.attn.in_proj_{weight,bias}`` ([q; k; v])
``blocks.i.attn.proj``                 ``layers.i.attn.attn.out_proj``
``blocks.i.mlp.fc1`` / ``fc2``         ``layers.i.ffn.layers.0.0`` / ``layers.i.ffn.layers.1``
``norm``                               ``ln1`` (needs ``final_norm=True``)
=====================================  ===============================================

Foundation-model extras (``head``, ``fc_norm``, ``mask_token``, MAE's ``decoder_*``) are ignored
and listed in the report; any other key is reported as unexpected and not converted.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from timm.layers import resample_abs_pos_embed

from ..utils.checkpoint_io import abbreviate, find_state_dict, read_checkpoint

__all__ = [
    "ConversionReport",
    "load_timm_vit_checkpoint",
    "convert_timm_vit_to_mmseg",
    "timm_vit_architecture",
]

# Known keys of ViT-based foundation models that are not part of the encoder: ignored, with a note.
_IGNORED_PREFIXES = ("head.", "fc_norm.", "pre_logits.", "decoder", "mask_token")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_MAP = {
    "norm1.weight": "ln1.weight",
    "norm1.bias": "ln1.bias",
    "norm2.weight": "ln2.weight",
    "norm2.bias": "ln2.bias",
    "attn.qkv.weight": "attn.attn.in_proj_weight",
    "attn.qkv.bias": "attn.attn.in_proj_bias",
    "attn.proj.weight": "attn.attn.out_proj.weight",
    "attn.proj.bias": "attn.attn.out_proj.bias",
    "mlp.fc1.weight": "ffn.layers.0.0.weight",
    "mlp.fc1.bias": "ffn.layers.0.0.bias",
    "mlp.fc2.weight": "ffn.layers.1.weight",
    "mlp.fc2.bias": "ffn.layers.1.bias",
}
_TOP_MAP = {
    "cls_token": "cls_token",
    "pos_embed": "pos_embed",
    "patch_embed.proj.weight": "patch_embed.projection.weight",
    "patch_embed.proj.bias": "patch_embed.projection.bias",
    "norm.weight": "ln1.weight",
    "norm.bias": "ln1.bias",
}


@dataclass
class ConversionReport:
    """What :func:`convert_timm_vit_to_mmseg` did.

    Args:
        converted: number of tensors written to the mmseg state dict.
        missing: timm keys the encoder needs but the checkpoint lacks.
        unexpected: checkpoint keys that are neither encoder keys nor known extras (not converted).
        ignored: known foundation-model extras (decoder, mask token, head, fc_norm), not converted.
        pos_embed_resized: ``((h, w), (h', w'))`` patch grids when ``pos_embed`` was interpolated.
        pos_embed_interpolation, pos_embed_antialiased: how it was interpolated (mode, antialias).
    """

    converted: int = 0
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)
    pos_embed_resized: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None
    pos_embed_interpolation: str = "bicubic"
    pos_embed_antialiased: bool = False

    def lines(self) -> List[str]:
        out = [f"converted {self.converted} tensors from timm/DeiT ViT layout to mmseg VisionTransformer"]
        if self.pos_embed_resized:
            (h, w), (h2, w2) = self.pos_embed_resized
            out.append(
                f"pos_embed interpolated ({self.pos_embed_interpolation}, cls slot kept) "
                f"from a {h}x{w} to a {h2}x{w2} patch grid"
                + (" (antialiased, as timm loads it)" if self.pos_embed_antialiased else "")
            )
        if self.ignored:
            out.append(
                f"ignored {len(self.ignored)} non-encoder keys (foundation-model extras): {abbreviate(self.ignored)}"
            )
        if self.missing:
            out.append(f"missing {len(self.missing)} keys: {abbreviate(self.missing)}")
        if self.unexpected:
            out.append(f"unexpected {len(self.unexpected)} keys (not converted): {abbreviate(self.unexpected)}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def load_timm_vit_checkpoint(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """Read a ViT state dict: bare, or wrapped as ``{'model': ...}`` / ``{'state_dict': ...}``
    (see docs/formats.md, timm / DeiT ViT checkpoints).

    Loads with ``weights_only=True``; ``argparse.Namespace`` (the ``args`` entry DeiT / MAE
    training scripts save beside the weights) is the only allow-listed class. A ``module.``
    prefix (DistributedDataParallel) is removed.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a PyTorch checkpoint, or holds no tensor state dict.
    """
    obj = read_checkpoint(
        path,
        what="PyTorch checkpoint of ViT weights",
        allow=[argparse.Namespace],
        unsafe_fix="only tensors, plain containers and argparse.Namespace are allowed",
    )
    return find_state_dict(obj, path=path, what="ViT state dict")


def timm_vit_architecture(state_dict: Dict[str, torch.Tensor]) -> dict:
    """Read embed dims, depth, patch size, MLP width and position grid off a timm ViT state dict."""
    arch: dict = {}
    w = state_dict.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4:
        arch.update(embed_dims=int(w.shape[0]), in_channels=int(w.shape[1]), patch_size=int(w.shape[-1]))
    blocks = {int(m.group(1)) for m in map(_BLOCK_KEY.match, state_dict) if m}
    if blocks:
        arch["num_layers"] = max(blocks) + 1
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None:
        arch["mlp_hidden"] = int(fc1.shape[0])
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        arch["pos_tokens"] = int(pos.shape[1])
        arch.setdefault("embed_dims", int(pos.shape[2]))
    return arch


def _describe(arch: dict) -> str:
    parts = [f"embed {arch.get('embed_dims', '?')}", f"{arch.get('num_layers', '?')} layers"]
    if "mlp_hidden" in arch:
        parts.append(f"MLP {arch['mlp_hidden']}")
    if "patch_size" in arch:
        parts.append(f"patch {arch['patch_size']}")
    return ", ".join(parts)


def _resample_pos_embed(pos: torch.Tensor, grid_hw: Tuple[int, int], mode: str, antialias: bool):
    """[1, 1 + g*g, C] -> [1, 1 + h*w, C] with timm's resampler; the cls slot is kept."""
    n = pos.shape[1] - 1
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(
            f"pos_embed {tuple(pos.shape)} is not one cls slot plus a square patch grid "
            f"({n} patch entries); checkpoints without a cls slot are not supported"
        )
    if (g, g) == tuple(grid_hw):
        return pos, None
    out = resample_abs_pos_embed(
        pos, new_size=list(grid_hw), old_size=[g, g], num_prefix_tokens=1, interpolation=mode, antialias=antialias
    )
    return out, ((g, g), tuple(grid_hw))


def convert_timm_vit_to_mmseg(
    state_dict: Dict[str, torch.Tensor],
    num_layers: int,
    embed_dims: int,
    grid_hw: Tuple[int, int],
    *,
    mlp_hidden: Optional[int] = None,
    patch_size: Optional[int] = None,
    interpolate_mode: str = "bicubic",
    antialias: bool = True,
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Rename a timm / DeiT ViT state dict to mmseg's ``VisionTransformer`` keys.

    Pure function: the input dict is not modified. ``pos_embed`` is resampled by timm's
    ``resample_abs_pos_embed`` (cls slot kept) when the checkpoint's patch grid differs from
    ``grid_hw`` (e.g. 14x14 from a 224 input used at 512: 32x32).

    Args:
        state_dict: timm layout (see docs/formats.md, timm / DeiT ViT checkpoints).
        num_layers: transformer blocks of the target model.
        embed_dims: embedding width of the target model.
        grid_hw: the target's patch grid ``(img_h // patch, img_w // patch)``.
        mlp_hidden: MLP width of the target (``mlp_ratio * embed_dims``); checked when given.
        patch_size: patch size of the target; checked when given.
        interpolate_mode: ``F.interpolate`` mode for the position table.
        antialias: True (default) resamples as timm loads a checkpoint at another size (its
            ``checkpoint_filter_fn``), so the model gives timm's own features there; False as
            mmseg's ``resize_pos_embed``.

    Returns:
        ``(mmseg_state_dict, report)``.

    Raises:
        ValueError: the checkpoint is another architecture (embed width, depth, MLP width or patch
            size differ); the message names both.
    """
    arch = timm_vit_architecture(state_dict)
    want = {"embed_dims": int(embed_dims), "num_layers": int(num_layers)}
    if mlp_hidden is not None:
        want["mlp_hidden"] = int(mlp_hidden)
    if patch_size is not None:
        want["patch_size"] = int(patch_size)
    clash = [k for k, v in want.items() if k in arch and arch[k] != v]
    if clash:
        raise ValueError(
            f"ViT checkpoint does not fit the model: the checkpoint is {_describe(arch)}; "
            f"the model is {_describe({**arch, **want})} (mismatch in {', '.join(clash)}). "
            "Use weights of the same ViT size or change the backbone settings."
        )

    out: Dict[str, torch.Tensor] = {}
    report = ConversionReport()
    for key, value in state_dict.items():
        if key in _TOP_MAP:
            new_key = _TOP_MAP[key]
        else:
            m = _BLOCK_KEY.match(key)
            if m and m.group(2) in _BLOCK_MAP and int(m.group(1)) < num_layers:
                new_key = f"layers.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"
            elif key.startswith(_IGNORED_PREFIXES):
                report.ignored.append(key)
                continue
            else:
                report.unexpected.append(key)
                continue
        out[new_key] = value
    if "pos_embed" in out:
        out["pos_embed"], report.pos_embed_resized = _resample_pos_embed(
            out["pos_embed"], tuple(int(v) for v in grid_hw), interpolate_mode, antialias
        )
        report.pos_embed_interpolation, report.pos_embed_antialiased = interpolate_mode, antialias

    expected = list(_TOP_MAP) + [f"blocks.{i}.{k}" for i in range(num_layers) for k in _BLOCK_MAP]
    report.missing = [k for k in expected if k not in state_dict]
    report.converted = len(out)
    return out, report
