"""RAT (the ``resolution_aware_transformer`` package's model) as a multi-scale backbone, 2D or 3D.

:class:`RATBackbone` keeps the package's modules and state-dict keys and adds an image pyramid
(built from one image by area resizing, or given level by level), per-block grouping attention
(dense, local, mixed or standard multi-head), an absolute position embedding option, and
:meth:`~RATBackbone.forward_features`: one ``NC[D]HW`` map per pyramid level and block, named
``level<l>_block<b>`` (the contract of :mod:`rat_plugins.models.features`). With grouping stride
``s`` and an odd grouping kernel, level ``l`` (resize factor ``scale_l``) after block ``b``
(0-based) has, per axis::

    grid   = ceil(ceil(size * scale_l) / s ** (b + 1))
    stride = s ** (b + 1) / scale_l        (input pixels: 2 ** (l + b + 1) for s=2, scales 1, 1/2, 1/4)
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from rat_plugins._optional import require
from rat_plugins.models.checkpointing import GradCheckpointing, run_block
from rat_plugins.models.features import FeatureInfo, feature_names, resolve_out_features
from rat_plugins.models.rat_ablations import AbsolutePositionConv, StandardMHAGrouping, WindowedMultiResAttention
from rat_plugins.models.rat_attention import (
    HEAD_LAYOUTS,
    ChunkedDenseSpatialGroupingAttention,
    LocalSpatialGroupingAttention,
)

_rat = require("resolution_aware_transformer", "rat_plugins.models.rat_backbone")
ResolutionAwareTransformer = _rat.ResolutionAwareTransformer
to_tuple = require("spatial_grouping_attention.utils", "rat_plugins.models.rat_backbone").to_tuple

__all__ = ["RATBackbone", "RATFeatureInfo", "block_attention_kinds", "tokens_to_map"]

Images = Union[torch.Tensor, Sequence[torch.Tensor]]
Masks = Optional[Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]]
ATTENTION_KINDS = ("dense", "local", "mha")


@dataclass(frozen=True)
class RATFeatureInfo(FeatureInfo):
    """A :class:`FeatureInfo` (stride per axis) plus the pyramid level and block the map comes from."""

    level: int
    block: int


def block_attention_kinds(attention: Union[str, Sequence[str]], num_blocks: int) -> Tuple[str, ...]:
    """Per-block grouping attention: ``"dense"``, ``"local"`` or ``"mha"``.

    Args:
        attention: ``"dense"``, ``"local"`` (alias ``"sparse"``, the package's name for windowed
            attention), ``"mha"`` (standard multi-head attention: softmax over keys only),
            ``"mixed"`` (local in the first ``ceil(num_blocks / 2)`` blocks, which see the finest
            grids, dense after), or one of ``dense`` / ``local`` / ``sparse`` / ``mha`` per block.
        num_blocks: blocks of the model.
    """
    if isinstance(attention, str):
        if attention == "mixed":
            num_local = math.ceil(num_blocks / 2)
            return ("local",) * num_local + ("dense",) * (num_blocks - num_local)
        attention = [attention] * num_blocks
    kinds = tuple("local" if kind == "sparse" else kind for kind in attention)
    if len(kinds) != num_blocks or any(kind not in ATTENTION_KINDS for kind in kinds):
        raise ValueError(
            f"attention must be 'dense', 'local', 'sparse', 'mha', 'mixed' or one of 'dense'/'local'/"
            f"'sparse'/'mha' per block ({num_blocks} blocks), got {attention!r}"
        )
    return kinds


def tokens_to_map(tokens: torch.Tensor, grid_shape: Sequence[int]) -> torch.Tensor:
    """``[B, N, C]`` row-major tokens -> ``[B, C, *grid_shape]`` map."""
    batch, num_tokens, channels = tokens.shape
    if num_tokens != math.prod(grid_shape):
        raise ValueError(f"{num_tokens} tokens do not fill the grid {tuple(grid_shape)}")
    return tokens.transpose(1, 2).reshape(batch, channels, *grid_shape)


class RATBackbone(GradCheckpointing, ResolutionAwareTransformer):
    """The package's ``ResolutionAwareTransformer`` returning feature maps per level and block.

    Args:
        spatial_dims: 2 (``[B, C, H, W]``) or 3 (``[B, C, D, H, W]``).
        input_features: image channels.
        feature_dims: channels of every map.
        num_blocks: grouping + multi-resolution attention blocks; one map per level per block.
        sga_kernel_size: grouping conv kernel (odd keeps grids at ``ceil(size / stride)``).
        stride: grouping conv stride per block (int or per axis, e.g. ``(1, 2, 2)`` for
            anisotropic 3D stacks).
        scales: resize factor of each pyramid level relative to the input image, in (0, 1]
            (a number or one per axis); ``(1.0,)`` is a single level. Strides are counted in
            pixels of the scale-1 image.
        attention: grouping attention per block, see :func:`block_attention_kinds`; ``"dense"``
            blocks are the package's layer computed in chunks
            (:class:`~rat_plugins.models.rat_attention.ChunkedDenseSpatialGroupingAttention`, no
            groups x pixels matrix), ``"mha"`` blocks
            :class:`~rat_plugins.models.rat_ablations.StandardMHAGrouping`.
        local_window: keyword arguments of the local layers (``neighborhood_kernel``,
            ``neighborhood_dilation``, ``chunk_elements``); see
            :class:`~rat_plugins.models.rat_attention.LocalSpatialGroupingAttention`.
        mr_window: None (the package: every token attends to every token of every level) or a
            window in tokens: each token attends to the tokens of each level within ``mr_window``
            of that level's spacing
            (:class:`~rat_plugins.models.rat_ablations.WindowedMultiResAttention`).
        head_layout: how the grouping layers split values into heads and merge them back:
            ``"package"`` (the package's reshape, which moves features across the image: a local
            layer then still sees far pixels) or ``"per_token"`` (standard multi-head; local
            layers are local); see :data:`~rat_plugins.models.rat_attention.HEAD_LAYOUTS`.
        pos_embed: ``"rotary"`` (the package's RoSE / RoPE, set by its keyword arguments) or
            ``"absolute"``: a fixed sine-cosine embedding of each token's centre added after the
            input projection (:class:`~rat_plugins.models.rat_ablations.AbsolutePositionConv`;
            2D only, needs ``rotary_ratio=0.0``).
        abs_ref_size: frame size (pixels) of the absolute embedding's coordinates: the normalised
            image coordinate times this, so the levels of a pyramid agree on positions.
        spacing: pixel spacing of the scale-1 image (number or per axis); level ``l`` defaults
            to ``spacing / scales[l]``.
        grad_checkpointing: recompute each block's activations in the backward pass (less memory,
            one more forward); also ``set_grad_checkpointing()``.
        **rat_kwargs: the package's other arguments (``num_heads``, ``iters``, ``mlp_ratio``,
            ``proj_kernel_size``, ``rotary_ratio``, ``learnable_rose``, ``rose_initial_scaling``, ...).

    :meth:`forward_features` is the multi-scale method the adapters call; ``forward`` stays the
    package's (last block's token dicts), now also with local, mixed and multi-head blocks.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        input_features: int = 3,
        feature_dims: int = 128,
        num_blocks: int = 4,
        sga_kernel_size: Union[int, Sequence[int]] = 5,
        stride: Union[int, Sequence[int]] = 2,
        scales: Sequence[Union[float, Sequence[float]]] = (1.0,),
        attention: Union[str, Sequence[str]] = "dense",
        local_window: Optional[dict] = None,
        mr_window: Optional[float] = None,
        head_layout: str = "package",
        pos_embed: str = "rotary",
        abs_ref_size: float = 256.0,
        spacing: Optional[Union[float, Sequence[float]]] = None,
        grad_checkpointing: bool = False,
        **rat_kwargs,
    ) -> None:
        if "sga_attention_type" in rat_kwargs:  # the package's "sparse" type needs NATTEN (CUDA only)
            raise ValueError(
                f"RATBackbone takes attention= ('dense' / 'local' / 'mha' / 'mixed' / per block), not "
                f"sga_attention_type={rat_kwargs['sga_attention_type']!r}"
            )
        if rat_kwargs.get("leading_tokens"):  # no place on a grid, and the package's forward never feeds them
            raise ValueError("RATBackbone does not take leading_tokens")
        if pos_embed not in ("rotary", "absolute"):
            raise ValueError(f"RATBackbone: pos_embed must be 'rotary' or 'absolute', got {pos_embed!r}")
        if pos_embed == "absolute" and spatial_dims != 2:
            raise ValueError("RATBackbone: pos_embed='absolute' is implemented for 2D images only")
        kinds = block_attention_kinds(attention, num_blocks)
        super().__init__(
            spatial_dims=spatial_dims,
            input_features=input_features,
            feature_dims=feature_dims,
            num_blocks=num_blocks,
            sga_attention_type="dense",
            sga_kernel_size=sga_kernel_size,
            stride=stride,
            spacing=spacing,
            **rat_kwargs,
        )
        if pos_embed == "absolute" and self.rotary_ratio != 0:
            raise ValueError(
                "RATBackbone: pos_embed='absolute' compares against rotary encodings; "
                "switch those off with rotary_ratio=0.0"
            )
        self.attention_kinds = kinds
        self.pos_embed = pos_embed
        self.grad_checkpointing = grad_checkpointing  # recompute each block's activations in backward
        # every variant keeps the weights the package built for its dense layers; dense blocks run
        # the same computation in chunks (the package's layer holds a groups x pixels matrix per head)
        for block, kind in enumerate(kinds):
            if kind == "local":
                self.sga_layers[block] = LocalSpatialGroupingAttention.from_layer(
                    self.sga_layers[block], **(local_window or {})
                )
            elif kind == "dense":
                ChunkedDenseSpatialGroupingAttention.from_layer(self.sga_layers[block])
        if pos_embed == "absolute":
            self.init_proj = AbsolutePositionConv.from_conv(self.init_proj, abs_ref_size)
        for block, kind in enumerate(kinds):
            if kind == "mha":
                StandardMHAGrouping.from_layer(self.sga_layers[block])
        if mr_window is not None:
            for layer in self.mr_attn_layers:
                WindowedMultiResAttention.from_layer(layer, mr_window)
        if head_layout not in HEAD_LAYOUTS:
            raise ValueError(f"RATBackbone: head_layout must be one of {HEAD_LAYOUTS}, got {head_layout!r}")
        for layer in self.sga_layers:
            layer.head_layout = head_layout
        self.scales = tuple(tuple(float(s) for s in to_tuple(scale, spatial_dims)) for scale in scales)
        if not self.scales or any(not 0 < s <= 1 for scale in self.scales for s in scale):
            raise ValueError(f"scales must be in (0, 1], one per pyramid level, got {scales!r}")
        self.feature_info = [
            RATFeatureInfo(
                name=f"level{level}_block{block}",
                level=level,
                block=block,
                channels=feature_dims,
                stride=tuple(_integral(s ** (block + 1) / sc) for s, sc in zip(self.stride, scale)),
            )
            for level, scale in enumerate(self.scales)
            for block in range(num_blocks)
        ]

    @property
    def num_levels(self) -> int:
        return len(self.scales)

    @property
    def spacing(self) -> Tuple[float, ...]:
        """Pixel spacing of the scale-1 image (e.g. halve it to evaluate at twice the resolution)."""
        return tuple(self._default_spacing)

    @spacing.setter
    def spacing(self, value: Union[float, Sequence[float]]) -> None:
        self._default_spacing = tuple(float(s) for s in to_tuple(value, self.spatial_dims))

    def resolve_out_features(self, wanted=None, arg: str = "out_features") -> Tuple[str, ...]:
        """Names of the maps an adapter returns, in order.

        ``wanted``: None or ``"all"`` (every map, level-major: ``level0_block0, level0_block1,
        ..., level1_block0, ...``), ``"by_stride"`` (every map, finest stride first, ties finer
        level first: the fine-to-coarse order UPerHead and FPN expect), or names / 0-based indices
        into :attr:`feature_info`. ``arg`` names the adapter's argument in the error message.
        """
        if wanted is None or wanted == "all":
            return tuple(feature_names(self.feature_info))
        if wanted == "by_stride":  # sorted() is stable: ties keep the level-major order
            return tuple(info.name for info in sorted(self.feature_info, key=lambda info: math.prod(info.stride)))
        try:
            return resolve_out_features(self.feature_info, wanted)
        except ValueError as e:
            raise ValueError(f"unknown {arg} {wanted!r}: {e} (or 'all' / 'by_stride')") from None

    # -- inputs ---------------------------------------------------------------------------------
    def level_sizes(self, image_size: Sequence[int]) -> List[Tuple[int, ...]]:
        """Grid of each pyramid level for a scale-1 image of ``image_size``: ``ceil(size * scale)``."""
        # the tolerance keeps e.g. 30 * 0.1 = 3.0000000000000004 at 3
        return [tuple(math.ceil(n * s - 1e-6) for n, s in zip(image_size, scale)) for scale in self.scales]

    def build_pyramid(self, image: torch.Tensor) -> List[torch.Tensor]:
        """One image -> one tensor per level, area-resized (an average: no aliasing)."""
        return [
            image if size == tuple(image.shape[2:]) else F.interpolate(image, size=size, mode="area")
            for size in self.level_sizes(image.shape[2:])
        ]

    def _levels(self, images: Images) -> List[torch.Tensor]:
        if isinstance(images, torch.Tensor):
            if images.dim() != self.spatial_dims + 2:
                raise ValueError(
                    f"expected a [B, C, {'D, ' * (self.spatial_dims == 3)}H, W] image, got shape {tuple(images.shape)}"
                )
            return self.build_pyramid(images)
        levels = list(images)
        if len(levels) != self.num_levels:
            raise ValueError(f"got {len(levels)} pyramid levels, the model has scales {self.scales}")
        # the strides this model reports hold only for levels of the sizes its scales give
        base = [n / s for n, s in zip(levels[0].shape[2:], self.scales[0])]
        for level, (x, scale) in enumerate(zip(levels, self.scales)):
            expected = [n * s for n, s in zip(base, scale)]
            if x.dim() != self.spatial_dims + 2 or any(abs(n - e) > 1 for n, e in zip(x.shape[2:], expected)):
                raise ValueError(
                    f"level {level} has shape {tuple(x.shape)}; scales {self.scales} and level 0 "
                    f"{tuple(levels[0].shape)} call for a grid of about {tuple(expected)}"
                )
        return levels

    def _level_spacing(self, spacing, num_levels: int) -> List[Tuple[float, ...]]:
        """None / number / per-axis spacing of the scale-1 image, or one per-axis spacing per level."""
        if (
            spacing is not None
            and not isinstance(spacing, (int, float))
            and len(spacing) > 0
            and not isinstance(spacing[0], (int, float))
        ):
            if len(spacing) != num_levels:
                raise ValueError(f"got {len(spacing)} spacings for {num_levels} levels")
            return [tuple(float(s) for s in to_tuple(level, self.spatial_dims)) for level in spacing]
        base = self.spacing if spacing is None else to_tuple(spacing, self.spatial_dims)
        return [tuple(float(b) / s for b, s in zip(base, scale)) for scale in self.scales]

    def _level_masks(self, masks: Masks, levels: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """One bool mask per level, or None (forms: see :meth:`forward_blocks`)."""
        if masks is None:
            return None
        if isinstance(masks, torch.Tensor):
            masks = [
                masks
                if tuple(masks.shape[1:]) == tuple(x.shape[2:])
                else F.interpolate(masks[:, None].float(), size=x.shape[2:], mode="area")[:, 0] > 0
                for x in levels
            ]
        masks = list(masks)
        if len(masks) != len(levels):
            raise ValueError(f"got {len(masks)} masks for {len(levels)} levels")
        if all(m is None for m in masks):
            return None
        # the package dilates every mask it is given: a level without one gets an empty mask
        return [
            torch.zeros(x.shape[:1] + x.shape[2:], dtype=torch.bool, device=x.device) if m is None else m.bool()
            for m, x in zip(masks, levels)
        ]

    # -- forward --------------------------------------------------------------------------------
    def _forward_sga(self, layer, out):
        """The package's step without its attention products: it multiplies every block's (groups x
        pixels) matrices into the previous block's (the memory of dense attention; local and
        multi-head layers return none), and features do not use them."""
        for state in out:
            result = layer(state["x_out"], state["out_spacing"], state["out_grid_shape"], state["mask"])
            result.pop("attn_q", None)
            result.pop("attn_k", None)
            state.update(result)
            state["mask"] = None  # as in the package: masked tokens are replaced in the first block only
        return out

    def forward_blocks(self, images: Images, spacing=None, masks: Masks = None) -> List[List[dict]]:
        """The package's per-level dicts (``x_out`` ``[B, N, C]`` tokens, ``out_grid_shape``,
        ``out_spacing``) after every block: ``result[block][level]``.

        Args:
            images: one image (the pyramid is built from it) or one tensor per level.
            spacing: None (``self.spacing``), the scale-1 image's spacing (number or per axis;
                levels get ``spacing / scale``), or one per-axis spacing per level.
            masks: None, one ``[B, *grid]`` bool mask of the input image (resized to each level:
                a level pixel is masked when any pixel under it is), or one (or None) per level.
                True marks a pixel whose token the package replaces by its learned mask embedding
                (after dilating the mask by the projection kernel), in the first block only.
        """
        levels = self._levels(images)
        out = self._prepare_inputs(levels, self._level_spacing(spacing, len(levels)), self._level_masks(masks, levels))
        # the package's forward, recording every block (it returns the last one only)
        for state in out:
            state["x_out"] = self.init_proj(state["x_out"]).flatten(2).transpose(1, 2)
        per_block = []
        for sga_layer, mr_attn_layer in zip(self.sga_layers, self.mr_attn_layers):
            out = run_block(self._forward_block, sga_layer, mr_attn_layer, out, enabled=self.grad_checkpointing)
            per_block.append([dict(state) for state in out])
        return per_block

    def _forward_block(self, sga_layer, mr_attn_layer, out):
        # on fresh copies of the level states: a checkpointed block recomputes from its unchanged inputs
        return self._forward_mr_attn(mr_attn_layer, self._forward_sga(sga_layer, [dict(state) for state in out]))

    def forward_features(self, images: Images, spacing=None, masks: Masks = None) -> Dict[str, torch.Tensor]:
        """``{name: [B, feature_dims, *grid]}`` in :attr:`feature_info` order (level-major);
        arguments as in :meth:`forward_blocks`."""
        per_block = self.forward_blocks(images, spacing, masks)
        return {
            info.name: tokens_to_map(
                per_block[info.block][info.level]["x_out"], per_block[info.block][info.level]["out_grid_shape"]
            )
            for info in self.feature_info
        }

    def __repr__(self) -> str:
        return (
            f"RATBackbone{self.spatial_dims}D(feature_dims={self.feature_dims}, num_blocks={self.num_blocks}, "
            f"scales={self.scales}, attention={self.attention_kinds})"
        )


def _integral(value: float) -> Union[int, float]:
    return int(round(value)) if abs(value - round(value)) < 1e-9 else value
