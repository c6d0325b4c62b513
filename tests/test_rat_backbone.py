"""RAT backbone and adapters: maps and strides per pyramid level and block, dense / local / multi-head
attention, absolute positions, map selection, detectron2 (output_shape, FPN on top) and mmseg (registry,
decode head) wrappers."""

import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from resolution_aware_transformer import ResolutionAwareTransformer

from rat_plugins.models.rat_ablations import AbsolutePositionConv, StandardMHAGrouping
from rat_plugins.models.rat_attention import ChunkedDenseSpatialGroupingAttention, LocalSpatialGroupingAttention
from rat_plugins.models.rat_backbone import RATBackbone, block_attention_kinds

torch.set_num_threads(1)  # tiny models: threads only add contention

TINY = dict(feature_dims=16, num_heads=2, iters=1, mlp_ratio=2)


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return RATBackbone(**{"num_blocks": 2, **TINY, **kwargs}).eval()


def check_maps_against_strides(model, maps, image_size, batch, spacing):
    """Every map: ``ceil(size / stride)`` per axis, the package's grid, and out_spacing = spacing x stride."""
    assert list(maps) == [info.name for info in model.feature_info]
    per_block = model.forward_blocks(torch.randn(batch, model.input_features, *image_size), spacing=spacing)
    for info in model.feature_info:
        grid = tuple(math.ceil(n / s) for n, s in zip(image_size, info.stride))
        assert maps[info.name].shape == (batch, info.channels, *grid), info
        state = per_block[info.block][info.level]
        assert tuple(state["out_grid_shape"]) == grid, info
        assert state["out_spacing"] == pytest.approx([spacing * s for s in info.stride]), info
    # maps of one stride have one shape, whichever level they come from
    by_stride = {}
    for info in model.feature_info:
        by_stride.setdefault(info.stride, set()).add(maps[info.name].shape)
    assert all(len(shapes) == 1 for shapes in by_stride.values())


@pytest.mark.parametrize(
    "image_size,scales,expected_strides",
    [
        ((50, 70), (1.0,), [2, 4]),
        ((48, 64), (1.0, 0.5, 0.25), [2, 4, 4, 8, 8, 16]),
        ((50, 70), (1.0, 0.5), [2, 4, 4, 8]),
        ((33, 17), (1.0, 0.25), [2, 4, 8, 16]),
    ],
)
def test_2d_maps_and_strides(image_size, scales, expected_strides):
    model = tiny(scales=scales)
    assert [info.stride for info in model.feature_info] == [(s, s) for s in expected_strides]
    with torch.no_grad():
        maps = model.forward_features(torch.randn(2, 3, *image_size), spacing=0.5)
        check_maps_against_strides(model, maps, image_size, batch=2, spacing=0.5)
    assert all(torch.isfinite(m).all() for m in maps.values())


@pytest.mark.parametrize(
    "image_size,stride,scales,expected_strides",
    [
        ((6, 13, 18), (1, 2, 2), (1.0, (1.0, 0.5, 0.5)), [(1, 2, 2), (1, 4, 4), (1, 4, 4), (1, 8, 8)]),
        ((8, 12, 10), 2, (1.0,), [(2, 2, 2), (4, 4, 4)]),
        ((7, 9, 8), 2, (1.0, 0.5), [(2, 2, 2), (4, 4, 4), (4, 4, 4), (8, 8, 8)]),
    ],
)
def test_3d_maps_and_strides(image_size, stride, scales, expected_strides):
    model = tiny(spatial_dims=3, input_features=1, stride=stride, scales=scales)
    assert [info.stride for info in model.feature_info] == expected_strides
    with torch.no_grad():
        maps = model.forward_features(torch.randn(1, 1, *image_size), spacing=2.0)
        check_maps_against_strides(model, maps, image_size, batch=1, spacing=2.0)


def test_explicit_pyramid_equals_the_built_one():
    model = tiny(scales=(1.0, 0.5))
    image = torch.randn(1, 3, 50, 70)
    pyramid = [image, F.avg_pool2d(image, 2)]  # area resizing by an exact factor 2
    with torch.no_grad():
        built = model.forward_features(image)
        explicit = model.forward_features(pyramid, spacing=[(1.0, 1.0), (2.0, 2.0)])
        assert all(torch.allclose(model.build_pyramid(image)[i], pyramid[i], atol=1e-6) for i in range(2))
        for name in built:
            assert torch.allclose(built[name], explicit[name], atol=1e-6), name
        # spacing matters (RoSE): another level spacing gives other features
        other = model.forward_features(pyramid, spacing=[(1.0, 1.0), (1.0, 1.0)])
        assert (other["level1_block1"] - built["level1_block1"]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="level 1 has shape"):
        model.forward_features([image, image])
    with pytest.raises(ValueError, match="pyramid levels"):
        model.forward_features([image])


def test_masks():
    model = tiny(scales=(1.0, 0.5))
    image = torch.randn(1, 3, 32, 48)
    mask = torch.zeros(1, 32, 48, dtype=torch.bool)
    mask[:, 5:9, 10:30] = True
    with torch.no_grad():
        plain = model.forward_features(image)
        empty = model.forward_features(image, masks=torch.zeros_like(mask))
        masked = model.forward_features(image, masks=mask)
        # one mask of the input image = per-level masks where a coarse pixel is masked if any under it is
        per_level = model.forward_features(image, masks=[mask, F.max_pool2d(mask[:, None].float(), 2)[:, 0] > 0])
        level0_only = model.forward_features(image, masks=[mask, None])
    for name in plain:
        assert torch.equal(plain[name], empty[name]), name
        assert torch.equal(masked[name], per_level[name]), name
    assert (masked["level0_block0"] - plain["level0_block0"]).abs().max() > 1e-3
    assert (level0_only["level1_block0"] - masked["level1_block0"]).abs().max() > 1e-4


def test_block_attention_kinds():
    assert block_attention_kinds("dense", 3) == ("dense",) * 3
    assert block_attention_kinds("sparse", 2) == ("local", "local")
    assert block_attention_kinds("mixed", 1) == ("local",)
    assert block_attention_kinds("mixed", 4) == ("local", "local", "dense", "dense")
    assert block_attention_kinds("mixed", 3) == ("local", "local", "dense")
    assert block_attention_kinds(["dense", "sparse"], 2) == ("dense", "local")
    assert block_attention_kinds("mha", 2) == ("mha", "mha")
    assert block_attention_kinds(["mha", "local"], 2) == ("mha", "local")
    for bad in ("full", ["dense"], ["dense", "natten"]):
        with pytest.raises(ValueError, match="attention must be"):
            block_attention_kinds(bad, 2)
    with pytest.raises(ValueError, match="takes attention="):
        RATBackbone(sga_attention_type="sparse", **TINY)


@pytest.mark.parametrize("attention", ["local", "mixed", ("dense", "local")])
def test_local_window_covering_everything_equals_dense(attention):
    """Same seed, windows larger than every grid: the local/mixed model is the dense model."""
    dense = tiny(scales=(1.0, 0.5)).double()
    local = tiny(scales=(1.0, 0.5), attention=attention, local_window=dict(neighborhood_kernel=99)).double()
    kinds = block_attention_kinds(attention, 2)
    assert [type(layer) for layer in local.sga_layers] == [
        LocalSpatialGroupingAttention if kind == "local" else ChunkedDenseSpatialGroupingAttention for kind in kinds
    ]
    assert local.state_dict().keys() == dense.state_dict().keys()
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in local.state_dict().items())
    image = torch.randn(1, 3, 24, 20, dtype=torch.float64)
    with torch.no_grad():
        got, ref = local.forward_features(image), dense.forward_features(image)
    for name in ref:
        assert (got[name] - ref[name]).abs().max() < 1e-10, name


def test_default_local_window_is_local():
    dense = tiny()
    local = tiny(attention="local")  # window: the grouping kernel (5), smaller than a 32x32 grid
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, ref = local.forward_features(image), dense.forward_features(image)
    assert got["level0_block0"].shape == ref["level0_block0"].shape
    assert (got["level0_block0"] - ref["level0_block0"]).abs().max() > 1e-3


@pytest.mark.parametrize("attention", [("local", "dense"), ("dense", "local")])
def test_mixed_blocks_run_and_train(attention):
    """The package's block loop raises KeyError (attn_q) when dense and local blocks mix; not here,
    also through the package's own forward, which this class inherits."""
    model = tiny(scales=(1.0, 0.5), attention=attention).train()
    image = torch.randn(1, 3, 24, 24)
    maps = model.forward_features(image)
    sum(m.square().mean() for m in maps.values()).backward()
    # mask embeddings are used only where a mask is given
    grads = {name: p.grad for name, p in model.named_parameters() if "mask_embedding" not in name}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["sga_layers.0.kv.weight"].abs().sum() > 0 and grads["sga_layers.1.kv.weight"].abs().sum() > 0
    with torch.no_grad():
        package_out = model.eval()(list(model.build_pyramid(image)), [(1.0, 1.0), (2.0, 2.0)])
        maps = model.forward_features(image)
    assert "attn_q" not in package_out[0]
    assert torch.allclose(
        package_out[0]["x_out"].transpose(1, 2).reshape(maps["level0_block1"].shape), maps["level0_block1"], atol=1e-6
    )


def test_ablation_options_keep_the_package_weights():
    """attention='mha' (per block too) and pos_embed='absolute' swap layers, not weights."""
    plain = tiny(scales=(1.0, 0.5))
    variant = tiny(scales=(1.0, 0.5), attention=("mha", "local"))
    assert [type(layer) for layer in variant.sga_layers] == [StandardMHAGrouping, LocalSpatialGroupingAttention]
    assert variant.attention_kinds == ("mha", "local")
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in variant.state_dict().items())
    image = torch.randn(1, 3, 24, 24)
    maps = variant.train().forward_features(image)
    sum(m.square().mean() for m in maps.values()).backward()
    assert variant.sga_layers[0].kv.weight.grad.abs().sum() > 0

    absolute = tiny(pos_embed="absolute", abs_ref_size=64, rotary_ratio=0.0)
    assert isinstance(absolute.init_proj, AbsolutePositionConv) and absolute.init_proj.ref_size == 64
    assert absolute.pos_embed == "absolute" and plain.pos_embed == "rotary"
    with torch.no_grad():
        assert torch.isfinite(absolute.forward_features(image)["level0_block1"]).all()
    with pytest.raises(ValueError, match="pos_embed must be 'rotary' or 'absolute'"):
        tiny(pos_embed="learned")
    with pytest.raises(ValueError, match="rotary_ratio=0.0"):
        tiny(pos_embed="absolute")
    with pytest.raises(ValueError, match="2D images only"):
        tiny(spatial_dims=3, input_features=1, pos_embed="absolute", rotary_ratio=0.0)


def test_resolve_out_features():
    model = tiny(scales=(1.0, 0.5, 0.25))  # strides: level-major 2 4 | 4 8 | 8 16
    names = [info.name for info in model.feature_info]
    assert model.resolve_out_features() == model.resolve_out_features("all") == tuple(names)
    assert model.resolve_out_features("by_stride") == (
        "level0_block0",
        "level0_block1",
        "level1_block0",
        "level1_block1",
        "level2_block0",
        "level2_block1",
    )
    assert model.resolve_out_features(["level1_block1", 0]) == ("level1_block1", "level0_block0")
    with pytest.raises(ValueError, match=r"unknown out_indices \[6\]"):
        model.resolve_out_features([6], arg="out_indices")


def test_same_weights_and_outputs_as_the_package_model():
    kwargs = dict(spatial_dims=2, input_features=3, num_blocks=2, sga_kernel_size=5, stride=2, **TINY)
    torch.manual_seed(0)
    package = ResolutionAwareTransformer(**kwargs).eval().double()
    model = RATBackbone(**kwargs).eval().double()  # its dense blocks compute in chunks: same numbers
    model.load_state_dict(package.state_dict(), strict=True)
    image = torch.randn(1, 3, 20, 28, dtype=torch.float64)
    with torch.no_grad():
        ref = package(image)[0]
        maps = model.forward_features(image)
    assert ref["out_grid_shape"] == (5, 7)
    assert (maps["level0_block1"].flatten(2).transpose(1, 2) - ref["x_out"]).abs().max() < 1e-12


def test_detectron2_output_shape_matches_and_fpn_runs():
    from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
    from detectron2.structures import ImageList

    from rat_plugins.detectron2.rat import RAT

    torch.manual_seed(0)
    backbone = RAT(scales=(1.0, 0.5, 0.25), num_blocks=2, **TINY)
    shapes = backbone.output_shape()
    assert {n: s.stride for n, s in shapes.items()} == {
        "level0_block0": 2,
        "level0_block1": 4,
        "level1_block0": 4,
        "level1_block1": 8,
        "level2_block0": 8,
        "level2_block1": 16,
    }
    assert backbone.size_divisibility == 16 and backbone.padding_constraints == {"size_divisibility": 16}
    # an odd-sized image, padded the way detectron2 pads a batch
    images = ImageList.from_tensors([torch.randn(3, 50, 70)], size_divisibility=backbone.size_divisibility)
    assert images.tensor.shape[-2:] == (64, 80)
    outputs = backbone(images.tensor)
    assert list(outputs) == list(shapes)
    for name, out in outputs.items():
        assert out.shape[1] == shapes[name].channels
        assert out.shape[-2:] == tuple(n // shapes[name].stride for n in images.tensor.shape[-2:]), name

    in_features = ["level0_block0", "level0_block1", "level1_block1", "level2_block1"]  # strides 2..16
    top_block = LastLevelMaxPool()
    top_block.in_feature = "p4"  # FPN names its outputs by stride: 2..16 -> p1..p4
    fpn = FPN(bottom_up=backbone, in_features=in_features, out_channels=8, top_block=top_block)
    fpn_shapes = fpn.output_shape()
    assert {n: s.stride for n, s in fpn_shapes.items()} == {"p1": 2, "p2": 4, "p3": 8, "p4": 16, "p5": 32}
    # GeneralizedRCNN pads to the FPN's divisibility: its largest input stride (the top block rounds up)
    assert fpn.size_divisibility == 16
    features = fpn(images.tensor)
    for name, feature in features.items():
        grid = tuple(math.ceil(n / fpn_shapes[name].stride) for n in images.tensor.shape[-2:])
        assert feature.shape == (1, 8, *grid), name
    sum(f.mean() for f in features.values()).backward()
    assert backbone.net.init_proj.weight.grad.abs().sum() > 0


def test_detectron2_yacs_build_and_errors():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from rat_plugins.detectron2.rat import RAT, add_rat_config

    cfg = get_cfg()
    add_rat_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_rat_backbone"
    cfg.MODEL.RAT.merge_from_list(
        [
            "FEATURE_DIMS",
            16,
            "NUM_BLOCKS",
            2,
            "NUM_HEADS",
            2,
            "ITERS",
            1,
            "SCALES",
            [1.0, 0.5],
            "ATTENTION",
            "local,dense",
            "NEIGHBORHOOD_KERNEL",
            3,
            "OUT_FEATURES",
            ["level0_block1", "level1_block1"],
        ]
    )
    backbone = build_backbone(cfg)
    assert isinstance(backbone, RAT) and backbone.net.attention_kinds == ("local", "dense")
    assert backbone.net.sga_layers[0].neighborhood_kernel == (3, 3)
    assert {n: (s.channels, s.stride) for n, s in backbone.output_shape().items()} == {
        "level0_block1": (16, 4),
        "level1_block1": (16, 8),
    }
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 32, 32))
    assert {n: tuple(o.shape) for n, o in outputs.items()} == {
        "level0_block1": (1, 16, 8, 8),
        "level1_block1": (1, 16, 4, 4),
    }
    with pytest.raises(ValueError, match="unknown out_features"):
        RAT(out_features=["p2"], **TINY)
    with pytest.raises(ValueError, match="integer stride"):
        RAT(scales=(1.0, 0.3), **TINY)


def test_detectron2_runs_the_ablations():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from rat_plugins.detectron2.rat import RAT, add_rat_config

    torch.manual_seed(0)
    backbone = RAT(
        scales=(1.0, 0.5),
        num_blocks=2,
        attention="mha",
        pos_embed="absolute",
        rotary_ratio=0.0,
        out_features="by_stride",
        **TINY,
    )
    assert all(isinstance(layer, StandardMHAGrouping) for layer in backbone.net.sga_layers)
    assert isinstance(backbone.net.init_proj, AbsolutePositionConv)
    assert {n: s.stride for n, s in backbone.output_shape().items()} == {
        "level0_block0": 2,
        "level0_block1": 4,
        "level1_block0": 4,
        "level1_block1": 8,
    }
    outputs = backbone(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape) for o in outputs.values()] == [(1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 8, 8), (1, 16, 4, 4)]

    cfg = get_cfg()
    add_rat_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_rat_backbone"
    cfg.MODEL.RAT.merge_from_list(
        [
            "FEATURE_DIMS",
            16,
            "NUM_BLOCKS",
            2,
            "NUM_HEADS",
            2,
            "ITERS",
            1,
            "ATTENTION",
            "mha,local",
            "POS_EMBED",
            "absolute",
            "ROTARY_RATIO",
            0.0,
        ]
    )
    built = build_backbone(cfg)
    assert built.net.attention_kinds == ("mha", "local") and isinstance(built.net.init_proj, AbsolutePositionConv)


def test_mmseg_registry_build_and_decode_head():
    from mmseg.models import EncoderDecoder
    from mmseg.registry import MODELS

    import rat_plugins.mm  # noqa: F401  (registers RAT)

    torch.manual_seed(0)
    cfg = dict(type="RAT", num_blocks=2, scales=[1.0, 0.5], out_indices=[0, 1, 3], **TINY)
    backbone = MODELS.build(cfg)
    assert backbone.out_channels == (16, 16, 16)
    assert backbone.strides == ((2, 2), (4, 4), (8, 8))
    image = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        maps = backbone(image)
    assert isinstance(maps, tuple)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 20, 28), (2, 16, 10, 14), (2, 16, 5, 7)]
    with pytest.raises(ValueError, match="out_indices"):
        MODELS.build({**cfg, "out_indices": [4]})

    segmentor = EncoderDecoder(
        backbone=cfg,
        decode_head=dict(
            type="FCNHead", in_channels=16, in_index=1, channels=8, num_convs=1, num_classes=2, concat_input=False
        ),
    )
    with torch.no_grad():
        logits = segmentor(image, mode="tensor")
    assert logits.shape == (2, 2, 10, 14)


def test_backbone_module_imports_no_framework():
    code = (
        "import sys, rat_plugins.models.rat_backbone; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('detectron2', 'mmcv', 'mmseg', 'mmdet', 'mmengine')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _masked_reference(block, xs, spacings, grids, window):
    """The package block's attention written out densely: logits of keys farther than ``window`` of
    their level's spacing (positions index x spacing, every axis) set to -inf before the softmax."""
    x = torch.cat(xs, 1)
    batch, n, dims = x.shape
    heads, head_dim = block.num_heads, block.head_dim
    q, k, v = block.qkv(block.norm1(x)).chunk(3, dim=-1)
    qs, ks, pos, reach = [], [], [], []
    start = 0
    for spacing, grid in zip(spacings, grids):
        count = math.prod(grid)
        qs.append(block.rose(q[:, start : start + count], spacing, grid).reshape(batch, count, heads, head_dim))
        ks.append(block.rose(k[:, start : start + count], spacing, grid).reshape(batch, count, heads, head_dim))
        for index in range(count):
            row, col = divmod(index, grid[1])
            pos.append((row * spacing[0], col * spacing[1]))
            reach.append((window * spacing[0], window * spacing[1]))
        start += count
    q, k = torch.cat(qs, 1).transpose(1, 2), torch.cat(ks, 1).transpose(1, 2)
    v = v.reshape(batch, n, heads, head_dim).transpose(1, 2)
    allowed = torch.tensor(
        [[all(abs(a - b) <= r for a, b, r in zip(pi, pj, rj)) for pj, rj in zip(pos, reach)] for pi in pos]
    )
    logits = (q @ k.transpose(-1, -2) * block.scale).masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, dims)
    x = x + block.proj(out)
    return x + block.mlp(block.norm2(x))


def test_windowed_multi_resolution_attention():
    """Window covering everything: the package's block; a small one: the masked dense reference, in
    chunks of queries; and a fine token's output then ignores fine tokens beyond the window."""
    from RoSE import MultiRes_RoSE_Block

    from rat_plugins.models.rat_ablations import WindowedMultiResAttention

    torch.manual_seed(0)
    package = MultiRes_RoSE_Block(feature_dims=16, num_heads=2, spatial_dims=2, rotary_ratio=0.5).double().eval()
    grids, spacings = [(6, 5), (3, 3)], [(1.0, 1.0), (2.0, 1.7)]
    xs = [torch.randn(2, math.prod(g), 16, dtype=torch.float64, requires_grad=True) for g in grids]
    windowed = WindowedMultiResAttention.from_layer(copy.deepcopy(package), window=100)
    windowed.chunk_elements = 7  # one query per chunk: chunking exercised
    with torch.no_grad():
        ref, got = package(xs, spacings, grids), windowed(xs, spacings, grids)
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(ref, got))
    windowed.window = 1.0
    ref = _masked_reference(windowed, xs, spacings, grids, 1.0).split([30, 9], dim=1)
    windowed.masked_rows_ratio = 0.0  # gathered keys (large grids)
    gathered = windowed(xs, spacings, grids)
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(ref, gathered))
    windowed.masked_rows_ratio = 8.0  # masked rows of every key (small grids, as here: 39 tokens, 15 seen)
    got = windowed(xs, spacings, grids)
    assert all((a - b).abs().max() < 1e-12 for a, b in zip(ref, got))
    # fine token (0, 0) sees fine tokens within one step only (coarse ones within 2 and 1.7)
    grad = torch.autograd.grad(got[0][:, 0].sum(), xs)
    reached = grad[0].abs().sum((0, 2)).reshape(6, 5) > 0
    assert reached[:2, :2].all() and reached.sum() == 4
    with pytest.raises(ValueError, match="mr_window must be > 0"):
        WindowedMultiResAttention.from_layer(copy.deepcopy(package), window=0)


def test_mr_window_limits_what_a_single_level_model_sees():
    """The context control's backbone (local grouping, kernels 3, mr_window=1, per-token heads): a
    level-0 output at the centre of a 96x96 image sees 16 pixels each side; with coarse levels the
    same output reaches the image's border."""
    kwargs = dict(
        num_blocks=2, attention="local", sga_kernel_size=3, proj_kernel_size=3, mr_window=1, head_layout="per_token"
    )
    for scales in ((1.0,), (1.0, 0.5, 0.25)):
        model = tiny(scales=scales, **kwargs).double()
        assert all(type(layer).__name__ == "WindowedMultiResAttention" for layer in model.mr_attn_layers)
        image = torch.randn(1, 3, 96, 96, dtype=torch.float64, requires_grad=True)
        centre = model.forward_features(image)["level0_block1"][0, :, 12, 12].sum()  # stride 4: pixel (48, 48)
        reached = (torch.autograd.grad(centre, image)[0].abs().sum((0, 1)) > 0).nonzero()
        low, high = reached.min(0).values.tolist(), reached.max(0).values.tolist()
        if len(scales) == 1:
            assert low == [32, 32] and high == [64, 64]
        else:
            assert low == [0, 0] and high == [95, 95]
    # the package's head layout moves features across the image: the single-level model sees far pixels
    model = tiny(scales=(1.0,), **{**kwargs, "head_layout": "package"}).double()
    image = torch.randn(1, 3, 96, 96, dtype=torch.float64, requires_grad=True)
    centre = model.forward_features(image)["level0_block1"][0, :, 12, 12].sum()
    assert torch.autograd.grad(centre, image)[0].abs().sum((0, 1))[:, :20].sum() > 0
    with pytest.raises(ValueError, match="head_layout must be one of"):
        tiny(head_layout="heads")
