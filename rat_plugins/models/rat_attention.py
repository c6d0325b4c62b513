"""RAT's grouping attention without its (groups x pixels) matrices: local windows, and dense in chunks.

Dense, in chunks: :class:`ChunkedDenseSpatialGroupingAttention` computes the package's dense layer
exactly with memory O(groups x chunk + pixels): no (batch, heads, groups, pixels) matrix.

Local windows:

The package's dense grouping layer holds (batch, heads, groups, pixels) attention matrices (tens
of GB at 256x256); its sparse one needs NATTEN (CUDA only). :class:`LocalSpatialGroupingAttention`
keeps the package's constructor, parameters and state-dict keys, and lets each group attend only
to a window of input tokens, gathered chunk by chunk: memory O(groups x window), pure PyTorch
(CPU and CUDA, 1D / 2D / 3D, autograd). A group's window is centred on input position
``g * stride`` (its strided-conv receptive field), ``neighborhood_kernel`` positions
``neighborhood_dilation`` apart (default: the grouping kernel), shifted inwards at the borders as
NATTEN does; an axis shorter than the window is taken whole. The output equals the package's dense
layer with the logits outside each window set to -inf.
"""

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rat_plugins._optional import require

_sga = require("spatial_grouping_attention", "rat_plugins.models.rat_attention")
SpatialGroupingAttention = _sga.SpatialGroupingAttention
DenseSpatialGroupingAttention = _sga.DenseSpatialGroupingAttention
to_tuple = _sga.utils.to_tuple

__all__ = [
    "HEAD_LAYOUTS",
    "split_value_heads",
    "merge_group_heads",
    "ChunkedDenseSpatialGroupingAttention",
    "LocalSpatialGroupingAttention",
    "axis_window_positions",
    "local_window_index",
    "expand_window_attention",
]


# How a grouping layer splits values into heads and merges the heads' updates. "package": as the
# package does, by reshaping (B, N, D) to (B, H, N, d) and (B, H, G, d) back to (B, G, D): head h of
# pixel n then holds features of pixel (h * N + n) // H, so values and updates move across the image
# (a layer with local windows still sees far pixels). "per_token": each token's own features split
# into heads (standard multi-head attention); a local layer is then local.
HEAD_LAYOUTS = ("package", "per_token")


def split_value_heads(values: torch.Tensor, num_heads: int, layout: str) -> torch.Tensor:
    """``(B, N, D)`` values as ``(B, H, N, D / H)`` in ``layout`` (see ``HEAD_LAYOUTS``)."""
    batch, tokens, dims = values.shape
    if layout == "per_token":
        return values.reshape(batch, tokens, num_heads, dims // num_heads).transpose(1, 2)
    if layout == "package":
        return values.reshape(batch, num_heads, tokens, dims // num_heads)
    raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS}, got {layout!r}")


def merge_group_heads(update: torch.Tensor, layout: str) -> torch.Tensor:
    """``(B, H, G, d)`` per-head updates as ``(B, G, H * d)`` in ``layout``."""
    batch, heads, groups, head_dims = update.shape
    if layout == "per_token":
        return update.transpose(1, 2).reshape(batch, groups, heads * head_dims)
    if layout == "package":
        return update.reshape(batch, groups, heads * head_dims)
    raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS}, got {layout!r}")


def axis_window_positions(
    num_groups: int,
    length: int,
    stride: int,
    kernel: int,
    dilation: int = 1,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Input positions each group attends to along one axis.

    Args:
        num_groups: groups along the axis.
        length: input tokens along the axis.
        stride: the strider's stride along the axis (group ``g`` is centred on ``g * stride``).
        kernel: positions in a window.
        dilation: distance between a window's positions.
        device: device of the result.

    Returns:
        ``(num_groups, taps)`` int64 tensor, ``taps = kernel`` (``length`` when the axis is
        shorter than ``kernel * dilation``: the window is then the whole axis).
    """
    if length < kernel * dilation:
        return torch.arange(length, device=device).expand(num_groups, length)
    centre = torch.arange(num_groups, device=device) * stride
    # a dilated window stays on its centre's lattice (positions congruent to it mod dilation)
    phase = centre % dilation
    lattice_length = (length - phase + dilation - 1) // dilation
    first = (centre // dilation - (kernel - 1) // 2).clamp(min=0)
    first = torch.minimum(first, lattice_length - kernel)  # shift inwards: the window stays full
    taps = torch.arange(kernel, device=device)
    return phase[:, None] + dilation * (first[:, None] + taps)


def local_window_index(
    input_grid_shape: Sequence[int],
    group_grid_shape: Sequence[int],
    stride: Sequence[int],
    kernel: Sequence[int],
    dilation: Sequence[int],
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Flat (row-major) input-token index of every group's window.

    Args:
        input_grid_shape: input grid, e.g. ``(H, W)`` or ``(D, H, W)``.
        group_grid_shape: group grid (the strider's output grid).
        stride, kernel, dilation: per axis, as in :func:`axis_window_positions`.
        device: device of the result.

    Returns:
        ``(groups, window)`` int64 tensor; a row's entries are distinct.
    """
    ndim = len(input_grid_shape)
    flat = None
    for axis in range(ndim):
        positions = axis_window_positions(
            group_grid_shape[axis], input_grid_shape[axis], stride[axis], kernel[axis], dilation[axis], device
        )
        # broadcast to (groups per axis..., taps per axis...) and add up row-major offsets
        shape = [1] * (2 * ndim)
        shape[axis], shape[ndim + axis] = positions.shape
        term = (positions * math.prod(input_grid_shape[axis + 1 :])).reshape(shape)
        flat = term if flat is None else flat + term
    return flat.reshape(math.prod(group_grid_shape), -1)


def expand_window_attention(
    window_attention: torch.Tensor, window_index: torch.Tensor, num_pixels: int
) -> torch.Tensor:
    """Dense ``(..., groups, pixels)`` form of compact ``(..., groups, window)`` attention.

    Args:
        window_attention: ``(..., groups, window)`` weights, e.g. ``attn_k_window``.
        window_index: ``(groups, window)`` input-token index (``attn_window_index``).
        num_pixels: input tokens.

    Returns:
        ``(..., groups, num_pixels)``, zero outside each window. For small inputs only: this is
        the matrix the local layer exists to avoid.
    """
    dense = window_attention.new_zeros(*window_attention.shape[:-1], num_pixels)
    return dense.scatter(-1, window_index.expand_as(window_attention), window_attention)


class _ChunkedResult:
    """Per-chunk results along dim 1. Under autograd: a list, concatenated at the end. Otherwise
    each chunk is copied into one preallocated tensor: the result is never held twice, and no
    small block outlives its chunk (on CPU, those pin holes between the chunks' large
    temporaries; at 1024² the heap then grew by about 1 GB)."""

    def __init__(self, recording: bool, like: torch.Tensor, shape: Sequence[int]) -> None:
        self.chunks = [] if recording else None
        self.buffer = None if recording else like.new_empty(shape)

    def put(self, start: int, value: torch.Tensor) -> None:
        if self.chunks is not None:
            self.chunks.append(value)
        else:
            self.buffer[:, start : start + value.shape[1]].copy_(value)

    def result(self) -> torch.Tensor:
        return torch.cat(self.chunks, dim=1) if self.chunks is not None else self.buffer


class LocalSpatialGroupingAttention(SpatialGroupingAttention):
    """The package's spatial grouping attention, each group restricted to a local window.

    Args:
        *args, **kwargs: the package's ``SpatialGroupingAttention`` arguments (``feature_dims``,
            ``spatial_dims``, ``kernel_size``, ``num_heads``, ``stride``, ``iters``, ...).
        neighborhood_kernel: window size per axis, in input tokens (int or per-axis sequence).
            Default: the strider's ``kernel_size``.
        neighborhood_dilation: distance between a window's tokens (int or per-axis sequence).
        chunk_elements: most elements of one gathered (batch, groups, window, features) block;
            groups are processed in chunks this size. Default: 2**20 on CPU (a block stays in
            cache: the forward is 1.5x faster than with 2**24 at 512² and 1024²), 2**26 on
            other devices (fewer kernel launches).

    ``forward(x, input_spacing, input_grid_shape, mask=None, return_attention=False)`` returns
    the package's dict (``x_out``, ``out_grid_shape``, ``out_spacing``); with
    ``return_attention=True`` also the last iteration's ``attn_k_window`` / ``attn_q_window``
    ``(batch, heads, groups, window)`` and ``attn_window_index`` ``(groups, window)``
    (:func:`expand_window_attention` gives the dense form). The dense layer's keys ``attn_k`` /
    ``attn_q`` are never returned: ``ResolutionAwareTransformer`` multiplies those across blocks
    as dense matrices.
    """

    head_layout: str = "package"  # see HEAD_LAYOUTS

    def __init__(
        self,
        *args,
        neighborhood_kernel: Optional[int | Sequence[int]] = None,
        neighborhood_dilation: int | Sequence[int] = 1,
        chunk_elements: Optional[int] = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if neighborhood_kernel is None:
            neighborhood_kernel = self.kernel_size
        self.neighborhood_kernel = to_tuple(
            neighborhood_kernel, self.spatial_dims, dtype_caster=int, allow_nested=False
        )
        self.neighborhood_dilation = to_tuple(
            neighborhood_dilation, self.spatial_dims, dtype_caster=int, allow_nested=False
        )
        if min(self.neighborhood_kernel) < 1 or min(self.neighborhood_dilation) < 1:
            raise ValueError(
                f"neighborhood_kernel {self.neighborhood_kernel} and neighborhood_dilation "
                f"{self.neighborhood_dilation} must be >= 1"
            )
        self.chunk_elements = chunk_elements

    @classmethod
    def from_layer(cls, layer: SpatialGroupingAttention, **window_kwargs) -> "LocalSpatialGroupingAttention":
        """A local layer with ``layer``'s hyper-parameters and weights (e.g. a dense layer of a
        built ``ResolutionAwareTransformer``). ``window_kwargs``: ``neighborhood_kernel``,
        ``neighborhood_dilation``, ``chunk_elements``."""
        rose = layer.rose
        local = cls(
            feature_dims=layer.feature_dims,
            spatial_dims=layer.spatial_dims,
            kernel_size=layer.kernel_size,
            num_heads=layer.num_heads,
            stride=layer.stride,
            iters=layer.iters,
            mlp_ratio=layer.mlp_ratio,
            mlp_dropout=layer.mlp_dropout,
            mlp_bias=layer.mlp_bias,
            mlp_activation=layer.mlp_activation,
            qkv_bias=layer.qkv_bias,
            base_theta=layer.base_theta,
            learnable_rose=layer.learnable_rose,
            rotary_ratio=layer.rotary_ratio,
            frequency_scaling=layer.frequency_scaling,
            learnable_rose_scaling=rose.learnable_scale,
            rose_initial_scaling=rose.initial_scaling,
            spacing=layer._default_spacing,
            **window_kwargs,
        )
        reference = next(layer.parameters())
        local.to(device=reference.device, dtype=reference.dtype)  # before loading: no rounding
        local.load_state_dict(layer.state_dict(), strict=True)
        # non-persistent buffers (fixed RoSE frequencies / scales) are not in the state dict
        for name, buffer in layer.named_buffers():
            local.get_buffer(name).copy_(buffer)
        return local.train(layer.training)

    def window_index(self, input_grid_shape: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
        """``(groups, window)`` flat input-token index of each group's window for this grid."""
        input_grid_shape = tuple(int(n) for n in input_grid_shape)
        return local_window_index(
            input_grid_shape,
            self._calculate_strided_grid_shape(input_grid_shape),
            self.stride,
            self.neighborhood_kernel,
            self.neighborhood_dilation,
            device,
        )

    def _groups_per_chunk(self, batch: int, window: int, features: int, device: torch.device) -> int:
        budget = self.chunk_elements or (2**20 if device.type == "cpu" else 2**26)
        return max(1, budget // (batch * window * features))

    def _window_softmax(self, keys: torch.Tensor, queries: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        """Softmax over each group's window. keys ``(B, N, H, d)``, queries ``(B, G, H, d)``
        (token-major: a gathered token is one contiguous row); returns ``(B, G, W, H)``."""
        batch, _, heads, head_dims = keys.shape
        groups, window = window_index.shape
        step = self._groups_per_chunk(batch, window, heads * head_dims, keys.device)
        recording = torch.is_grad_enabled() and (keys.requires_grad or queries.requires_grad)
        attn_k = _ChunkedResult(recording, keys, (batch, groups, window, heads))
        for start in range(0, groups, step):
            index = window_index[start : start + step]
            window_keys = keys.index_select(1, index.reshape(-1)).view(batch, len(index), window, heads, head_dims)
            logits = (window_keys * queries[:, start : start + step, None]).sum(-1)
            attn_k.put(start, logits.softmax(dim=2))
        return attn_k.result()

    def _share_and_aggregate(
        self, attn_k: torch.Tensor, values: torch.Tensor, window_index: torch.Tensor, keep_attention: bool
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Divide each pixel's weights by their sum over the groups that see it (the package's
        ``attn_q``), then aggregate values. attn_k ``(B, G, W, H)``, values ``(B, N, H, d)``;
        returns ``(B, G, H, d)`` and, if kept, attn_q ``(B, G, W, H)``."""
        batch, groups, window, heads = attn_k.shape
        head_dims = values.shape[-1]
        claimed = attn_k.new_zeros(batch, values.shape[1], heads).index_add(
            1, window_index.reshape(-1), attn_k.reshape(batch, groups * window, heads)
        )
        eps = torch.finfo(attn_k.dtype).eps  # the package's guard for pixels no group claims
        step = self._groups_per_chunk(batch, window, heads * head_dims, values.device)
        recording = torch.is_grad_enabled() and (attn_k.requires_grad or values.requires_grad)
        updates = _ChunkedResult(recording, values, (batch, groups, heads, head_dims))
        shares = _ChunkedResult(recording, attn_k, attn_k.shape) if keep_attention else None
        for start in range(0, groups, step):
            index = window_index[start : start + step].reshape(-1)
            count = len(index) // window
            claimed_here = claimed.index_select(1, index).view(batch, count, window, heads)
            attn_q = attn_k[:, start : start + step] / (claimed_here + eps)
            window_values = values.index_select(1, index).view(batch, count, window, heads, head_dims)
            updates.put(start, (attn_q.unsqueeze(-1) * window_values).sum(2))
            if keep_attention:
                shares.put(start, attn_q)
        return updates.result(), (shares.result() if keep_attention else None)

    def attn(
        self,
        k: torch.Tensor,
        q: torch.Tensor,
        q_grid_shape: int | Tuple[int, ...],
        input_grid_shape: int | Tuple[int, ...],
    ) -> torch.Tensor:
        """The package's hook, compact: k ``(B, H, N_k, d)``, q ``(B, H, N_q, d)`` as in the
        package; returns the windowed softmax ``(B, H, N_q, window)`` (not ``(B, H, N_q, N_k)``)."""
        window_index = self.window_index(to_tuple(input_grid_shape, self.spatial_dims), k.device)
        attn_k = self._window_softmax(k.transpose(1, 2).contiguous(), q.transpose(1, 2), window_index)
        return attn_k.permute(0, 3, 1, 2)

    def forward(
        self,
        x: torch.Tensor,
        input_spacing: Tuple[float, ...],
        input_grid_shape: Tuple[int, ...],
        mask: Optional[torch.Tensor] = None,
        return_attention: bool = False,
    ) -> Dict[str, Any]:
        """Args:
        x: ``(B, N_in, D)`` input tokens, row-major over ``input_grid_shape``.
        input_spacing: physical spacing of the input grid.
        input_grid_shape: input grid shape.
        mask: optional ``(B, *input_grid_shape)``; tokens where it is > 0 are replaced by
            the learned mask embedding.
        return_attention: also return the compact attention maps (see the class docstring).
        """
        input_grid_shape = tuple(int(n) for n in input_grid_shape)
        group_spacing = self._calculate_strided_spacing(input_spacing)
        group_grid_shape = self._calculate_strided_grid_shape(input_grid_shape)
        batch, num_pixels, dims = x.shape
        if mask is not None:
            masked = (mask.to(x.device) > 0).reshape(batch, num_pixels, 1)
            x = torch.where(masked, self.mask_embedding, x)

        groups = self.strider(x.transpose(1, 2).reshape(batch, dims, *input_grid_shape))
        groups = self.norm1(groups.flatten(2).transpose(1, 2))  # (B, G, D)
        window_index = self.window_index(input_grid_shape, x.device)

        # keys and values depend on x alone: computed once, not once per iteration, and one
        # after the other (the halves of self.kv), so the full-resolution pair never coexists
        key_weight, value_weight = self.kv.weight.chunk(2, dim=0)
        key_bias, value_bias = (None, None) if self.kv.bias is None else self.kv.bias.chunk(2)
        keys = torch.nn.functional.linear(x, key_weight, key_bias)
        keys = self.temp * self.rose(keys, input_spacing, input_grid_shape, flatten=False)  # (B, N, H, d)
        values = torch.nn.functional.linear(x, value_weight, value_bias)
        values = split_value_heads(values, self.num_heads, self.head_layout).transpose(1, 2).contiguous()

        attn_k = attn_q = None
        for _ in range(self.iters):
            queries = self.rose(self.q(groups), group_spacing, group_grid_shape, flatten=False)  # (B, G, H, d)
            attn_k = self._window_softmax(keys, queries, window_index)
            update, attn_q = self._share_and_aggregate(attn_k, values, window_index, return_attention)
            groups = groups + self.norm2(merge_group_heads(update.transpose(1, 2), self.head_layout))
            groups = groups + self.norm3(self.mlp(groups))

        out = {"x_out": groups, "out_grid_shape": group_grid_shape, "out_spacing": group_spacing}
        if return_attention:
            out["attn_k_window"] = None if attn_k is None else attn_k.permute(0, 3, 1, 2).contiguous()
            out["attn_q_window"] = None if attn_q is None else attn_q.permute(0, 3, 1, 2).contiguous()
            out["attn_window_index"] = window_index
        return out


def _claimed_by_chunk(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Column sums of ``softmax(queries @ keys^T)`` (softmax over keys): ``(B, H, N)``."""
    return torch.softmax(queries @ keys.transpose(-1, -2), dim=-1).sum(dim=-2)


class ChunkedDenseSpatialGroupingAttention(DenseSpatialGroupingAttention):
    """The package's dense grouping layer, exact, without its (batch, heads, groups, pixels) matrices.

    The package computes ``attn_k = softmax_pixels(q k^T)``, ``attn_q = attn_k / (sum_groups attn_k +
    eps)`` and the update ``attn_q @ v``. Dividing columns commutes with the product, so the update is
    ``softmax(q k^T) @ (v / (claimed + eps))`` with ``claimed[p] = sum_g attn_k[g, p]``: one
    memory-efficient ``scaled_dot_product_attention`` (flash kernels on CPU and CUDA) once
    ``claimed`` is known. ``claimed`` is summed over chunks of groups; under autograd each chunk is
    recomputed in backward (``torch.utils.checkpoint``), so training holds no matrix either.

    Same parameters, buffers and state-dict keys as the package's layer (:meth:`from_layer` converts
    one in place); ``forward`` returns ``x_out``, ``out_grid_shape`` and ``out_spacing``, not the
    package's ``attn_q`` / ``attn_k`` matrices.

    Attributes:
        chunk_elements: most elements of one chunk's (batch, heads, groups, pixels) block;
            default 2**24 (64 MB in fp32).
    """

    chunk_elements: Optional[int] = None
    head_layout: str = "package"

    @classmethod
    def from_layer(
        cls, layer: DenseSpatialGroupingAttention, chunk_elements: Optional[int] = None
    ) -> "ChunkedDenseSpatialGroupingAttention":
        """``layer`` itself, converted: same modules, parameters and buffers; only the forward differs."""
        if type(layer) is not DenseSpatialGroupingAttention and not isinstance(layer, cls):
            raise TypeError(
                f"from_layer converts the package's DenseSpatialGroupingAttention, got {type(layer).__name__}"
            )
        layer.__class__ = cls
        layer.chunk_elements = chunk_elements
        return layer

    def _groups_per_chunk(self, keys: torch.Tensor) -> int:
        batch, heads, pixels, _ = keys.shape
        return max(1, (self.chunk_elements or 2**24) // (batch * heads * pixels))

    def claimed(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """``(B, H, N)``: each pixel's attention summed over the groups (the package's denominator
        without ``eps``). keys ``(B, H, N, d)`` (temperature included), queries ``(B, H, G, d)``."""
        step = self._groups_per_chunk(keys)
        recording = torch.is_grad_enabled() and (keys.requires_grad or queries.requires_grad)
        total = None
        for start in range(0, queries.shape[2], step):
            chunk = queries[:, :, start : start + step]
            part = (
                checkpoint(_claimed_by_chunk, keys, chunk, use_reentrant=False)
                if recording
                else _claimed_by_chunk(keys, chunk)
            )
            total = part if total is None else total + part
        return total

    def forward(
        self,
        x: torch.Tensor,
        input_spacing: Tuple[float, ...],
        input_grid_shape: Tuple[int, ...],
        mask: Optional[torch.Tensor] = None,
    ) -> Dict[str, Any]:
        """The package's forward (arguments and ``x_out`` the same); see the class docstring."""
        group_spacing = self._calculate_strided_spacing(input_spacing)
        group_grid_shape = self._calculate_strided_grid_shape(input_grid_shape)
        batch, num_pixels, dims = x.shape
        if mask is not None:
            masked = (mask.to(x.device) > 0).reshape(batch, num_pixels, 1)
            x = torch.where(masked, self.mask_embedding, x)
        groups = self.strider(x.transpose(1, 2).reshape(batch, dims, *input_grid_shape))
        groups = self.norm1(groups.flatten(2).transpose(1, 2))  # (B, G, D)
        # keys and values depend on x alone: once, not once per iteration as in the package
        keys, values = self.kv(x).chunk(2, dim=-1)
        keys = self.temp * self.rose(keys, input_spacing, input_grid_shape, flatten=False).transpose(1, 2)
        values = split_value_heads(values, self.num_heads, self.head_layout)
        eps = torch.finfo(keys.dtype).eps
        for _ in range(self.iters):
            queries = self.rose(self.q(groups), group_spacing, group_grid_shape, flatten=False).transpose(1, 2)
            shared = values / (self.claimed(keys, queries).unsqueeze(-1) + eps)
            update = F.scaled_dot_product_attention(queries, keys, shared, scale=1.0)  # (B, H, G, d)
            groups = groups + self.norm2(merge_group_heads(update, self.head_layout))
            groups = groups + self.norm3(self.mlp(groups))
        return {"x_out": groups, "out_grid_shape": group_grid_shape, "out_spacing": group_spacing}
