"""LocalSpatialGroupingAttention and ChunkedDenseSpatialGroupingAttention against the package's own
dense layer.

The reference is the package's ``DenseSpatialGroupingAttention`` unchanged except for its ``attn``
hook, whose logits outside each group's window are set to -inf; the windows come from a
transliteration of NATTEN's ``get_window_start`` below, not from the code under test.
"""

import copy
import itertools
import math
import subprocess
import sys

import pytest
import torch
from spatial_grouping_attention import DenseSpatialGroupingAttention
from torch.utils._python_dispatch import TorchDispatchMode

from rat_plugins.models.rat_attention import (
    ChunkedDenseSpatialGroupingAttention,
    LocalSpatialGroupingAttention,
    axis_window_positions,
    expand_window_attention,
)


def natten_window_start(index, length, kernel, dilation):
    """NATTEN's get_window_start (csrc/include/natten/cpu/naive/natten_cpu_commons.h), odd kernels."""
    radius = kernel // 2
    if dilation <= 1:
        return max(index - radius, 0) + (index + radius >= length) * (length - index - radius - 1)
    if index - radius * dilation < 0:
        return index % dilation
    if index + radius * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * radius * dilation
        return a + imodd - kernel * dilation
    return index - radius * dilation


def natten_axis_windows(num_groups, length, stride, kernel, dilation):
    """Per group: the set of input positions NATTEN's rule gives the pixel the group sits on."""
    windows = []
    for g in range(num_groups):
        start = natten_window_start(g * stride, length, kernel, dilation)
        windows.append({start + j * dilation for j in range(kernel)})
    return windows


def allowed_pairs(input_grid_shape, group_grid_shape, stride, kernel, dilation):
    """(groups, pixels) bool: pixel inside the group's window on every axis."""
    per_axis = [
        natten_axis_windows(g, n, s, k, d)
        for n, g, s, k, d in zip(input_grid_shape, group_grid_shape, stride, kernel, dilation)
    ]
    allowed = torch.zeros(math.prod(group_grid_shape), math.prod(input_grid_shape), dtype=torch.bool)
    for gi, group in enumerate(itertools.product(*[range(g) for g in group_grid_shape])):
        for pi, pixel in enumerate(itertools.product(*[range(n) for n in input_grid_shape])):
            allowed[gi, pi] = all(p in axis[g] for axis, g, p in zip(per_axis, group, pixel))
    return allowed


class WindowMaskedDense(DenseSpatialGroupingAttention):
    """The package's dense layer; logits of (group, pixel) pairs outside ``allowed`` are -inf."""

    allowed = None

    def attn(self, k, q, q_grid_shape, input_grid_shape):
        logits = torch.einsum("bhqd,bhkd->bhqk", q, k)  # the package's dense attn, then the mask
        return logits.masked_fill(~self.allowed.to(logits.device), float("-inf")).softmax(dim=-1)


CASES = {
    # name: layer kwargs, window kwargs, input grid
    "2d": (dict(spatial_dims=2, kernel_size=5, stride=2), dict(), (13, 11)),
    "2d_dilated": (
        dict(spatial_dims=2, kernel_size=3, stride=1),
        dict(neighborhood_kernel=3, neighborhood_dilation=2),
        (9, 10),
    ),
    "2d_small_window": (
        dict(spatial_dims=2, kernel_size=(5, 3), stride=(2, 1)),
        dict(neighborhood_kernel=(3, 5)),
        (10, 9),
    ),
    "3d": (dict(spatial_dims=3, kernel_size=3, stride=2), dict(), (5, 7, 6)),
}


def build_pair(name, iters=3, seed=0):
    layer_kwargs, window_kwargs, grid = CASES[name]
    kwargs = dict(feature_dims=16, num_heads=2, iters=iters, mlp_ratio=2, **layer_kwargs)
    torch.manual_seed(seed)
    local = LocalSpatialGroupingAttention(**kwargs, **window_kwargs).double()
    dense = WindowMaskedDense(**kwargs).double()
    dense.load_state_dict(local.state_dict(), strict=True)
    group_grid = local._calculate_strided_grid_shape(grid)
    dense.allowed = allowed_pairs(
        grid, group_grid, local.stride, local.neighborhood_kernel, local.neighborhood_dilation
    )
    return local, dense, grid


def random_input(grid, batch=2, features=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, math.prod(grid), features, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    "length,stride,kernel,dilation",
    [
        (10, 1, 3, 1),
        (10, 1, 5, 2),
        (17, 1, 3, 3),
        (16, 3, 7, 1),
        (23, 2, 5, 2),
        (12, 4, 3, 3),
        (9, 1, 9, 1),
    ],
)
def test_axis_windows_follow_natten(length, stride, kernel, dilation):
    num_groups = (length - 1) // stride + 1
    got = axis_window_positions(num_groups, length, stride, kernel, dilation)
    expected = natten_axis_windows(num_groups, length, stride, kernel, dilation)
    assert got.shape == (num_groups, kernel)
    assert [set(row.tolist()) for row in got] == expected


def test_axis_windows_by_hand():
    # 10 tokens, stride 3 -> groups on 0, 3, 6, 9; window of 5 shifted inwards at both ends
    assert axis_window_positions(4, 10, 3, 5).tolist() == [
        [0, 1, 2, 3, 4],
        [1, 2, 3, 4, 5],
        [4, 5, 6, 7, 8],
        [5, 6, 7, 8, 9],
    ]
    # an axis shorter than kernel * dilation is taken whole
    assert axis_window_positions(2, 4, 2, 5).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize("kernel,stride", [(7, 3), (4, 2), (5, 2)])
def test_default_window_is_the_strider_receptive_field(kernel, stride):
    """Away from the borders a group's default window is exactly the pixels its conv reads."""
    layer = LocalSpatialGroupingAttention(
        feature_dims=8, num_heads=1, spatial_dims=1, kernel_size=kernel, stride=stride, rotary_ratio=0.0
    )
    length = 40
    x = torch.randn(1, 8, length, requires_grad=True)
    groups = layer.strider(x)
    windows = layer.window_index((length,))
    for g in range(2, groups.shape[-1] - 2):  # interior groups: no padding involved
        (grad,) = torch.autograd.grad(groups[0, :, g].sum(), x, retain_graph=True)
        read = set(torch.nonzero(grad.abs().sum(1)[0]).flatten().tolist())
        assert read == set(windows[g].tolist()), g


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_window_masked_dense(name):
    local, dense, grid = build_pair(name)
    x = random_input(grid)
    spacing = (0.5,) * len(grid)
    mask = torch.rand(x.shape[0], *grid, generator=torch.Generator().manual_seed(2)) > 0.8
    for m in (None, mask):
        got = local(x, spacing, grid, mask=m)
        ref = dense(x, spacing, grid, mask=m)
        assert got["out_grid_shape"] == ref["out_grid_shape"]
        assert got["out_spacing"] == ref["out_spacing"]
        assert got["x_out"].shape == ref["x_out"].shape
        assert (got["x_out"] - ref["x_out"]).abs().max() < 1e-5
    # the windows matter: the unmasked dense layer with the same weights gives another answer
    unmasked = DenseSpatialGroupingAttention(
        feature_dims=16, num_heads=2, iters=3, mlp_ratio=2, **CASES[name][0]
    ).double()
    unmasked.load_state_dict(local.state_dict(), strict=True)
    assert (unmasked(x, spacing, grid)["x_out"] - local(x, spacing, grid)["x_out"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_float32_matches_window_masked_dense(name):
    local, dense, grid = build_pair(name)
    local.float(), dense.float()
    x = random_input(grid).float()
    diff = (local(x, (1.0,) * len(grid), grid)["x_out"] - dense(x, (1.0,) * len(grid), grid)["x_out"]).abs().max()
    assert diff < 1e-4  # measured ~5e-6: float32 rounding, summed in another order


def test_window_covering_everything_is_the_package_dense_layer():
    """Windows larger than the input: no mask at all, the unmodified package layer."""
    kwargs = dict(feature_dims=16, num_heads=2, spatial_dims=2, kernel_size=5, stride=2, mlp_ratio=2)
    torch.manual_seed(0)
    local = LocalSpatialGroupingAttention(**kwargs, neighborhood_kernel=9).double()
    dense = DenseSpatialGroupingAttention(**kwargs).double()
    dense.load_state_dict(local.state_dict(), strict=True)
    grid = (6, 8)
    x = random_input(grid)
    assert (local(x, (1.0, 1.0), grid)["x_out"] - dense(x, (1.0, 1.0), grid)["x_out"]).abs().max() < 1e-10


def test_chunking_and_no_grad_do_not_change_the_result():
    local, dense, grid = build_pair("2d")
    x = random_input(grid)  # batch 2: chunks are not contiguous slices
    ref = dense(x, (1.0, 1.0), grid)["x_out"]
    for chunk_elements in (2**24, 1):  # one chunk; one group per chunk
        local.chunk_elements = chunk_elements
        with_grad = local(x, (1.0, 1.0), grid)["x_out"]
        with torch.no_grad():  # the in-place path
            without_grad = local(x, (1.0, 1.0), grid)["x_out"]
        assert with_grad.requires_grad and not without_grad.requires_grad
        assert (with_grad - ref).abs().max() < 1e-5 and (without_grad - ref).abs().max() < 1e-5


def test_state_dict_round_trip():
    kwargs = dict(feature_dims=16, num_heads=2, spatial_dims=2, kernel_size=5, stride=2)
    torch.manual_seed(0)
    dense = DenseSpatialGroupingAttention(**kwargs)
    local = LocalSpatialGroupingAttention(**kwargs)
    assert local.state_dict().keys() == dense.state_dict().keys()
    local.load_state_dict(dense.state_dict(), strict=True)  # dense -> local
    for key, value in dense.state_dict().items():
        assert torch.equal(local.state_dict()[key], value), key
    with torch.no_grad():
        for p in local.parameters():
            p.add_(torch.randn_like(p))
    back = DenseSpatialGroupingAttention(**kwargs)
    back.load_state_dict(local.state_dict(), strict=True)  # local -> dense
    for key, value in local.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # from_layer: hyper-parameters and weights taken from a built layer
    converted = LocalSpatialGroupingAttention.from_layer(back)
    assert (converted.kernel_size, converted.stride, converted.iters) == (back.kernel_size, back.stride, back.iters)
    for key, value in back.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["2d", "3d"])
def test_attention_maps(name):
    local, dense, grid = build_pair(name, iters=2)
    x = random_input(grid, batch=1)
    plain = local(x, (1.0,) * len(grid), grid)
    assert not any(key.startswith("attn") for key in plain)  # only when asked for
    got = local(x, (1.0,) * len(grid), grid, return_attention=True)
    ref = dense(x, (1.0,) * len(grid), grid)
    window_index = got["attn_window_index"]
    groups, pixels = ref["attn_k"].shape[-2:]
    assert window_index.shape == (groups, math.prod(local.neighborhood_kernel))
    for key in ("attn_k", "attn_q"):
        compact = got[key + "_window"]
        assert compact.shape == (1, local.num_heads, groups, window_index.shape[1])
        expanded = expand_window_attention(compact, window_index, pixels)
        assert (expanded - ref[key]).abs().max() < 1e-5
    assert torch.allclose(got["attn_k_window"].sum(-1), torch.ones((), dtype=torch.float64))
    assert (
        expand_window_attention(torch.ones_like(got["attn_k_window"]), window_index, pixels).bool() == dense.allowed
    ).all()


def test_attn_hook_is_the_compact_masked_softmax():
    """The package's ``attn(k, q, ...)`` hook, overridden: compact, equal to the masked one."""
    local, dense, grid = build_pair("2d_dilated")
    groups, pixels = dense.allowed.shape
    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, local.num_heads, pixels, 8, generator=g, dtype=torch.float64)
    q = torch.randn(2, local.num_heads, groups, 8, generator=g, dtype=torch.float64)
    group_grid = local._calculate_strided_grid_shape(grid)
    compact = local.attn(k, q, group_grid, grid)
    assert compact.shape == (2, local.num_heads, groups, 9)
    expanded = expand_window_attention(compact, local.window_index(grid), pixels)
    assert (expanded - dense.attn(k, q, group_grid, grid)).abs().max() < 1e-12


def test_gradients_match_window_masked_dense():
    local, dense, grid = build_pair("2d", iters=2)
    x = random_input(grid)
    mask = torch.rand(x.shape[0], *grid, generator=torch.Generator().manual_seed(3)) > 0.7
    weight = torch.randn(x.shape[0], math.prod(local._calculate_strided_grid_shape(grid)), 16, dtype=torch.float64)
    grads = []
    for layer in (local, dense):
        xin = x.clone().requires_grad_(True)
        (layer(xin, (1.0, 1.0), grid, mask=mask)["x_out"] * weight).sum().backward()
        grads.append({"x": xin.grad, **{n: p.grad for n, p in layer.named_parameters()}})
    for name, g_local in grads[0].items():
        assert g_local is not None and torch.isfinite(g_local).all(), name
        assert (g_local - grads[1][name]).abs().max() < 1e-5 * (1 + grads[1][name].abs().max()), name
    assert grads[0]["x"].abs().sum() > 0 and grads[0]["kv.weight"].abs().sum() > 0


def test_in_resolution_aware_transformer():
    """Swapped into the package's RAT: tiny input (windows cover all) equals the dense model."""
    from resolution_aware_transformer import ResolutionAwareTransformer

    torch.manual_seed(0)
    model = (
        ResolutionAwareTransformer(
            spatial_dims=2, input_features=3, feature_dims=16, num_blocks=2, num_heads=2, sga_kernel_size=5, iters=2
        )
        .double()
        .eval()
    )
    image = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = model(image)[0]["x_out"]
        for i, layer in enumerate(model.sga_layers):
            model.sga_layers[i] = LocalSpatialGroupingAttention.from_layer(layer, neighborhood_kernel=11)
        got = model(image)
    assert (got[0]["x_out"] - ref).abs().max() < 1e-10
    assert "attn_q" not in got[0]
    with torch.no_grad():  # larger input: windows smaller than the grid, and the shapes RAT expects
        out = model(torch.randn(1, 3, 24, 20, dtype=torch.float64))[0]
    assert out["out_grid_shape"] == (6, 5) and out["x_out"].shape == (1, 30, 16)  # two stride-2 blocks


@pytest.mark.parametrize(
    "spatial_dims, grid, chunk_elements, with_mask",
    [(2, (13, 11), 500, False), (2, (13, 11), 1, True), (2, (9, 10), None, False), (3, (5, 6, 4), 300, True)],
)
def test_chunked_dense_is_the_package_dense_layer(spatial_dims, grid, chunk_elements, with_mask):
    """Outputs and every gradient, in float64, for chunks of one group up to all groups at once."""
    torch.manual_seed(0)
    package = DenseSpatialGroupingAttention(
        feature_dims=16, spatial_dims=spatial_dims, kernel_size=3, num_heads=4, stride=2, iters=3
    ).double()
    chunked = ChunkedDenseSpatialGroupingAttention.from_layer(copy.deepcopy(package), chunk_elements=chunk_elements)
    x = torch.randn(2, math.prod(grid), 16, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, *grid) > 0.7) if with_mask else None
    spacing = tuple(1.0 + 0.5 * axis for axis in range(spatial_dims))
    ref = package(x, spacing, grid, mask)
    got = chunked(x, spacing, grid, mask)
    assert got["out_grid_shape"] == ref["out_grid_shape"] and got["out_spacing"] == ref["out_spacing"]
    assert (got["x_out"] - ref["x_out"]).abs().max() < 1e-12
    assert "attn_k" not in got and "attn_q" not in got
    weights = torch.randn_like(ref["x_out"])
    inputs = [x, *package.parameters()]
    grads_ref = torch.autograd.grad((ref["x_out"] * weights).sum(), inputs, allow_unused=True)
    grads = torch.autograd.grad((got["x_out"] * weights).sum(), [x, *chunked.parameters()], allow_unused=True)
    for name, g_ref, g in zip(["x", *(n for n, _ in package.named_parameters())], grads_ref, grads):
        assert (g_ref is None) == (g is None), name
        if g is not None:
            assert (g - g_ref).abs().max() < 1e-9 * max(1.0, g_ref.abs().max().item()), name


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in torch.utils._pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.most = max(self.most, value.numel())
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_chunked_dense_never_holds_a_groups_by_pixels_matrix(grad):
    """At a 64x64 grid the package's layer holds (heads x 1024 groups x 4096 pixels) matrices; the
    chunked one nothing larger than its chunk, in the forward and (recomputing chunks) the backward."""
    torch.manual_seed(0)
    heads, grid = 4, (64, 64)
    layer = ChunkedDenseSpatialGroupingAttention.from_layer(
        DenseSpatialGroupingAttention(feature_dims=16, spatial_dims=2, kernel_size=5, num_heads=heads, stride=2),
        chunk_elements=2**18,
    )
    x = torch.randn(1, math.prod(grid), 16, requires_grad=grad)
    matrix = heads * (32 * 32) * math.prod(grid)
    tracker = LargestTensor()
    with tracker, torch.set_grad_enabled(grad):
        out = layer(x, (1.0, 1.0), grid)["x_out"]
        if grad:
            out.square().sum().backward()
    assert tracker.most <= 2**18 < matrix // 16
    with torch.set_grad_enabled(grad), LargestTensor() as package_tracker:  # what the check would catch
        DenseSpatialGroupingAttention.forward(layer, x, (1.0, 1.0), grid)
    assert package_tracker.most == matrix


def test_chunked_dense_converts_only_the_dense_layer():
    local = LocalSpatialGroupingAttention(feature_dims=16, spatial_dims=2, kernel_size=3, num_heads=2)
    with pytest.raises(TypeError, match="converts the package's DenseSpatialGroupingAttention, got Local"):
        ChunkedDenseSpatialGroupingAttention.from_layer(local)


def test_module_imports_no_framework():
    code = (
        "import sys, rat_plugins.models.rat_attention; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('detectron2', 'mmcv', 'mmseg', 'mmdet', 'mmengine')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
