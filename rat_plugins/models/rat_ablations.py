"""Ablation variants of the RAT package's layers that the package itself does not offer.

- :class:`AbsolutePositionConv`: the input projection plus a fixed sine-cosine absolute position
  embedding (the package only has rotary encodings);
- :class:`StandardMHAGrouping`: the dense grouping layer with plain multi-head attention (softmax
  over keys only, no renormalisation over queries);
- :class:`WindowedMultiResAttention`: the multi-resolution block with each token restricted to
  nearby tokens of every level (a window counted in each level's tokens), so that context beyond
  a fine level's window is reachable only through the coarser levels (the study's positive control).

All keep the package's parameters and state-dict keys; :class:`~rat_plugins.models.rat_backbone.RATBackbone`
selects them with ``pos_embed='absolute'``, ``attention='mha'`` and ``mr_window=``.
"""

import math

import torch
import torch.nn.functional as F

from .._optional import require
from .rat_attention import merge_group_heads, split_value_heads

_sga = require("spatial_grouping_attention", "rat_plugins.models.rat_ablations")
MultiRes_RoSE_Block = require("RoSE", "rat_plugins.models.rat_ablations").MultiRes_RoSE_Block

__all__ = ["sincos_position_map", "AbsolutePositionConv", "StandardMHAGrouping", "WindowedMultiResAttention"]


def sincos_position_map(grid_shape, channels: int, ref_size: float, device=None, dtype=None) -> torch.Tensor:
    """``[1, channels, *grid_shape]`` fixed sine-cosine embedding of each cell's centre.

    Per axis, the centre ``(i + 0.5) / n`` of cell ``i`` of ``n`` times ``ref_size`` is embedded with
    ``channels // (2 * ndim)`` frequencies ``10000 ** (-k / F)`` (ViT / MAE style), sines then
    cosines; the remaining channels (if ``channels`` is not a multiple of ``2 * ndim``) are zero.
    """
    ndim = len(grid_shape)
    num_freq = channels // (2 * ndim)
    if num_freq == 0:
        raise ValueError(f"absolute position embedding needs at least {2 * ndim} channels, got {channels}")
    omega = 10000.0 ** (-torch.arange(num_freq, device=device, dtype=torch.float64) / num_freq)
    axes = [(torch.arange(n, device=device, dtype=torch.float64) + 0.5) / n * ref_size for n in grid_shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    parts = []
    for g in grids:
        angle = g[..., None] * omega  # [*grid, F]
        parts += [angle.sin(), angle.cos()]
    pe = torch.cat(parts, dim=-1)
    pe = F.pad(pe, (0, channels - pe.shape[-1]))
    return pe.movedim(-1, 0)[None].to(dtype or torch.get_default_dtype())


class AbsolutePositionConv(torch.nn.Conv2d):
    """The package's input projection (same weights and keys) plus :func:`sincos_position_map`."""

    ref_size: float = 256.0

    @classmethod
    def from_conv(cls, conv: torch.nn.Conv2d, ref_size: float) -> "AbsolutePositionConv":
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        new.load_state_dict(conv.state_dict(), strict=True)
        new.ref_size = float(ref_size)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + sincos_position_map(y.shape[2:], y.shape[1], self.ref_size, y.device, y.dtype)


class StandardMHAGrouping(_sga.DenseSpatialGroupingAttention):
    """The package's dense grouping layer with standard multi-head attention: each strided-conv
    query attends to the input tokens with a softmax over keys and is updated by the weighted
    values, with no renormalisation over queries (no competition of groups for pixels). Same
    parameters and state-dict keys; returns no attention matrices."""

    head_layout: str = "package"  # see rat_plugins.models.rat_attention.HEAD_LAYOUTS

    @classmethod
    def from_layer(cls, layer) -> "StandardMHAGrouping":
        layer.__class__ = cls  # same modules, parameters and buffers; only the forward differs
        return layer

    def forward(self, x, input_spacing, input_grid_shape, mask=None):
        q_spacing = self._calculate_strided_spacing(input_spacing)
        q_grid_shape = self._calculate_strided_grid_shape(input_grid_shape)
        batch, n_in, dims = x.shape
        if mask is not None:
            x = torch.where(
                (mask.to(x.device) > 0).flatten(1).unsqueeze(-1), self.mask_embedding.expand(batch, n_in, dims), x
            )
        x_out = self.strider(x.transpose(1, 2).reshape(batch, dims, *input_grid_shape))
        x_out = self.norm1(x_out.flatten(2).transpose(1, 2))
        for _ in range(self.iters):
            k, v = self.kv(x).chunk(2, dim=-1)
            k = self.temp * self.rose(k, input_spacing, input_grid_shape, flatten=False).transpose(1, 2)
            q = self.rose(self.q(x_out), q_spacing, q_grid_shape, flatten=False).transpose(1, 2)
            v = split_value_heads(v, self.num_heads, self.head_layout)
            # the package's logits q.k (temperature in k), softmax over keys: standard attention
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # [B, H, N_out, d]
            x_out = x_out + self.norm2(merge_group_heads(out, self.head_layout))
            x_out = x_out + self.norm3(self.mlp(x_out))
        return {"x_out": x_out, "out_grid_shape": q_grid_shape, "out_spacing": q_spacing}


def _token_positions(grid_shape, spacing, device, dtype) -> torch.Tensor:
    """``(N, ndim)`` positions ``index * spacing``, row-major: the package's RoSE coordinates."""
    axes = [torch.arange(n, device=device, dtype=dtype) * float(s) for n, s in zip(grid_shape, spacing)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid_shape))


class WindowedMultiResAttention(MultiRes_RoSE_Block):
    """The package's multi-resolution block (pre-norm RoSE attention over the tokens of every level,
    then the MLP) with each query restricted to the keys near it: a key of a level with spacing
    ``s`` is seen when it lies within ``window * s`` of the query on every axis (positions as the
    package's RoSE gives them, ``index * spacing``). A fine token thus sees ``window`` fine tokens
    each side and proportionally more ground through each coarser level. Each query gathers the
    few keys its window can hold (``(2 * window + 1) ** ndim`` per level), in chunks of queries:
    no tokens x tokens matrix; on small grids (tokens at most ``masked_rows_ratio`` x the keys a
    query can see) chunks of query rows attend to every key under the window's mask instead.
    ``window=inf`` is the package's block (slowly)."""

    window: float = math.inf
    chunk_elements: int = 2**22
    # at most this many tokens per key a query may see: rows of all keys under a mask (a matmul)
    # instead of gathered keys; gathering wins on large grids (measured on CPU: 4x faster masked
    # at 1344 tokens / 363 keys, 1.5x slower at 3024 / 147)
    masked_rows_ratio: float = 8.0

    @classmethod
    def from_layer(cls, layer, window: float) -> "WindowedMultiResAttention":
        if not window > 0:
            raise ValueError(f"mr_window must be > 0 (tokens of each level), got {window!r}")
        layer.__class__ = cls  # same modules and parameters; only the forward differs
        layer.window = float(window)
        return layer

    def _neighbours(self, spacings, grids, device):
        """``(N, K)`` index of the keys each query may see, and ``(N, K)`` which of them it does: per
        key level, the ``taps`` nearest tokens per axis around the query (every token the window
        can hold), each checked against the window. Kept for the next call with the same grids."""
        key = (tuple(map(tuple, spacings)), tuple(map(tuple, grids)), self.window, str(device))
        cache = self.__dict__.setdefault("_neighbour_cache", {})
        if key not in cache:
            reach = self.window * (1 + 1e-9)
            positions = torch.cat([_token_positions(g, s, device, torch.float64) for s, g in zip(spacings, grids)])
            indices, seen, offset = [], [], 0
            for spacing, grid in zip(spacings, grids):
                flat, visible = 0, True
                for axis, (step, length) in enumerate(zip(spacing, grid)):
                    taps = length if 2 * reach + 1 >= length else math.floor(2 * reach) + 1
                    centre = positions[:, axis] / step  # the query in this level's token units
                    first = torch.ceil(centre - reach).clamp(min=0).clamp(max=length - taps)
                    cells = first[:, None] + torch.arange(taps, device=device, dtype=torch.float64)
                    inside = (cells - centre[:, None]).abs() <= reach
                    shape = [positions.shape[0]] + [1] * len(grid)
                    shape[axis + 1] = taps
                    flat = flat * length + cells.long().reshape(shape)
                    visible = visible & inside.reshape(shape)
                indices.append(flat.reshape(positions.shape[0], -1) + offset)
                seen.append(visible.expand_as(flat).reshape(positions.shape[0], -1))
                offset += math.prod(grid)
            cache.clear()  # one shape at a time: a run trains at one size
            cache[key] = (torch.cat(indices, 1), torch.cat(seen, 1))
        return cache[key]

    def _allowed(self, index, seen, tokens):
        """The ``tokens x tokens`` mask of the masked-rows path, built once per ``_neighbours`` entry
        (the same ``index`` tensor comes back while the grids stay the same)."""
        cached = self.__dict__.get("_allowed_cache")
        if cached is None or cached[0] is not index:
            mask = torch.zeros(tokens, tokens, dtype=torch.bool, device=index.device).scatter_(1, index, seen)
            cached = self.__dict__["_allowed_cache"] = (index, mask)
        return cached[1]

    def _attend(self, q, k, v, index, seen):
        """q / k / v ``(B, H, N, d)``; each query attends to its ``index`` keys where ``seen``."""
        batch, heads, tokens, head_dim = q.shape
        dropout = self.attn_dropout if self.training else 0.0
        if tokens <= self.masked_rows_ratio * index.shape[1]:
            allowed = self._allowed(index, seen, tokens)
            step = max(1, self.chunk_elements // (batch * heads * tokens))
            return torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[:, :, first : first + step], k, v, allowed[first : first + step], dropout, scale=self.scale
                    )
                    for first in range(0, tokens, step)
                ],
                dim=2,
            )
        step = max(1, self.chunk_elements // (batch * heads * index.shape[1] * head_dim))
        chunks = []
        for first in range(0, tokens, step):
            rows = index[first : first + step]
            near_k = k.index_select(2, rows.reshape(-1)).view(batch, heads, *rows.shape, head_dim)
            near_v = v.index_select(2, rows.reshape(-1)).view(batch, heads, *rows.shape, head_dim)
            logits = (q[:, :, first : first + step, None] * near_k).sum(-1) * self.scale
            weights = logits.masked_fill(~seen[first : first + step], float("-inf")).softmax(-1)
            weights = F.dropout(weights, dropout, self.training)
            chunks.append((weights.unsqueeze(-1) * near_v).sum(3))
        return torch.cat(chunks, dim=2)

    def forward(self, x, input_spacing, input_grid_shape, leading_tokens: bool = False):
        if leading_tokens:
            raise ValueError("WindowedMultiResAttention: leading (non-spatial) tokens have no position")
        was_list = isinstance(x, (list, tuple))
        x, spacings, grids, _ = self._prepare_inputs(x, input_spacing, input_grid_shape, 0)
        batch, num_tokens, dims = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        queries, keys = [], []
        start = 0
        for spacing, grid in zip(spacings, grids):
            n = math.prod(grid)
            queries.append(self.rose(q[:, start : start + n], spacing, grid).reshape(batch, n, heads, head_dim))
            keys.append(self.rose(k[:, start : start + n], spacing, grid).reshape(batch, n, heads, head_dim))
            start += n
        q, k = torch.cat(queries, 1).transpose(1, 2), torch.cat(keys, 1).transpose(1, 2)
        v = v.reshape(batch, num_tokens, heads, head_dim).transpose(1, 2)
        attended = self._attend(q, k, v, *self._neighbours(spacings, grids, x.device))
        attended = attended.transpose(1, 2).reshape(batch, num_tokens, dims)
        x = x + self.drop_path(self.proj_dropout(self.proj(attended)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        if len(grids) == 1 and not was_list:
            return x
        sizes = [math.prod(grid) for grid in grids]
        return list(x.split(sizes, dim=1))
