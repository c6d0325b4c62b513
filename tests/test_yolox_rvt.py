"""RVT's PAFPN (3 and 4 levels, official key map) and the size-aware YOLOX head (weights, loss)."""

import math

import pytest
import torch
import torch.nn.functional as F

from rat_plugins.models.maxvit_rnn import rvt_stage_names
from rat_plugins.models.size_aware_loss import size_aware_weights
from rat_plugins.models.yolox_pafpn import YoloxPafpn, convert_rvt_to_yolox_pafpn, load_rvt_fpn, rvt_fpn_key_map

torch.set_num_threads(1)


def _randomize(module, seed=0):
    """Random weights and BN statistics, so that a wrong mapping changes the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point():
                t.normal_(0.0, 0.3)
    return module.eval()


def _pyramid(channels, size, batch=2, seed=1):
    """Input maps fine to coarse: level i is size / 2^i square."""
    torch.manual_seed(seed)
    return [torch.randn(batch, c, size >> i, size >> i) for i, c in enumerate(channels)]


# ------------------------------------------------------------------------------------------------
# PAFPN


@pytest.mark.parametrize("channels,strides", [((16, 32, 64), (8, 16, 32)), ((8, 16, 32, 64), (2, 4, 8, 16))])
def test_pafpn_shapes_and_strides(channels, strides):
    image = 64
    neck = YoloxPafpn(channels, depth=0.33).eval()
    feats = [torch.randn(2, c, image // s, image // s) for c, s in zip(channels, strides)]
    outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [(2, c, image // s, image // s) for c, s in zip(channels, strides)]
    n = len(channels)
    assert len(neck.lateral_convs) == len(neck.top_down_blocks) == n - 1
    assert len(neck.downsample_convs) == len(neck.bottom_up_blocks) == n - 1

    # with out_channels every level has one width, as mmdet's YOLOXHead needs
    wide = YoloxPafpn(channels, depth=0.33, out_channels=24).eval()
    assert [o.shape[1] for o in wide(feats)] == [24] * n
    # an ordered {name: map} dict as MaxViTRNN returns it: all four stages, the neck takes RVT's in_stages
    names = rvt_stage_names(range(5 - n, 5))
    by_name = YoloxPafpn(channels, depth=0.33, in_features=names).eval()
    by_name.load_state_dict(neck.state_dict())
    every_stage = {"stage1": torch.randn(2, 4, image, image), **dict(zip(names, feats))}
    assert all(torch.equal(a, b) for a, b in zip(by_name(every_stage), outs))
    assert all(torch.equal(a, b) for a, b in zip(neck(dict(zip(names, feats))), outs))  # a dict in order


def test_four_level_pafpn_mixes_every_level():
    """The extra top-down / bottom-up step is wired in: every output depends on every input."""
    neck = _randomize(YoloxPafpn((8, 16, 32, 64), depth=0.33))
    feats = [f.requires_grad_() for f in _pyramid((8, 16, 32, 64), 32, batch=1)]
    outs = neck(feats)
    for o in outs:
        grads = torch.autograd.grad(o.sum(), feats, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="at least two"):
        YoloxPafpn((8,))


# RVT's module names and the shapes its YOLOPAFPN gives them for channels (C0, C1, C2), written out
# from RVT's yolo_pafpn.py structure, not read off YoloxPafpn.
def _official_conv_shapes(c0, c1, c2):
    def csp(cin, cout):
        h = cout // 2
        return {
            "conv1": (h, cin, 1, 1),
            "conv2": (h, cin, 1, 1),
            "conv3": (cout, 2 * h, 1, 1),
            "m.0.conv1": (h, h, 1, 1),
            "m.0.conv2": (h, h, 3, 3),
        }

    shapes = {
        "lateral_conv0": (c1, c2, 1, 1),
        "reduce_conv1": (c0, c1, 1, 1),
        "bu_conv2": (c0, c0, 3, 3),
        "bu_conv1": (c1, c1, 3, 3),
    }
    for name, (cin, cout) in {
        "C3_p4": (2 * c1, c1),
        "C3_p3": (2 * c0, c0),
        "C3_n3": (2 * c0, c1),
        "C3_n4": (2 * c1, c2),
    }.items():
        shapes.update({f"{name}.{sub}": s for sub, s in csp(cin, cout).items()})
    return shapes


def _to_official(state_dict, with_head_stems=False):
    """Our state dict -> RVT's Lightning layout, by inverting the documented key map."""
    inverse = {ours: official for official, ours in rvt_fpn_key_map(with_head_stems).items()}
    out = {}
    for key, value in state_dict.items():
        prefix = next(p for p in inverse if key.startswith(p))
        out[inverse[prefix] + key[len(prefix) :]] = value.clone()
    return out


def _reference_ops(sd, prefix):
    """conv-BN-SiLU, one-bottleneck CSP (depth 0.33, no shortcut) and 2x upsampling, evaluated
    straight from a state dict (eval-mode BN)."""

    def base(name, x, stride=1):
        w = sd[f"{prefix}{name}.conv.weight"]
        x = F.conv2d(x, w, stride=stride, padding=(w.shape[-1] - 1) // 2)
        x = F.batch_norm(
            x,
            sd[f"{prefix}{name}.bn.running_mean"],
            sd[f"{prefix}{name}.bn.running_var"],
            sd[f"{prefix}{name}.bn.weight"],
            sd[f"{prefix}{name}.bn.bias"],
            eps=1e-5,
        )
        return F.silu(x)

    def csp(name, x):
        a = base(f"{name}.m.0.conv2", base(f"{name}.m.0.conv1", base(f"{name}.conv1", x)))
        return base(f"{name}.conv3", torch.cat([a, base(f"{name}.conv2", x)], 1))

    def up(x):
        return F.interpolate(x, scale_factor=2, mode="nearest-exact")

    return base, csp, up


def _rvt_reference_forward(sd, feats):
    """RVT's three-level YOLOPAFPN.forward, step by step, on official keys."""
    base, csp, up = _reference_ops(sd, "mdl.fpn.")
    x2, x1, x0 = feats
    fpn_out0 = base("lateral_conv0", x0)
    f_out0 = csp("C3_p4", torch.cat([up(fpn_out0), x1], 1))
    fpn_out1 = base("reduce_conv1", f_out0)
    pan_out2 = csp("C3_p3", torch.cat([up(fpn_out1), x2], 1))
    pan_out1 = csp("C3_n3", torch.cat([base("bu_conv2", pan_out2, 2), fpn_out1], 1))
    pan_out0 = csp("C3_n4", torch.cat([base("bu_conv1", pan_out1, 2), fpn_out0], 1))
    return pan_out2, pan_out1, pan_out0


def _four_level_reference_forward(sd, feats):
    """The four-level PAFPN unrolled by hand: RVT's pattern with one more top-down step (lateral 2,
    top-down 2 at the finest level) and one more bottom-up step (downsample / bottom-up 2)."""
    base, csp, up = _reference_ops(sd, "")
    x0, x1, x2, x3 = feats  # fine to coarse
    lat0 = base("lateral_convs.0", x3)
    td0 = csp("top_down_blocks.0", torch.cat([up(lat0), x2], 1))
    lat1 = base("lateral_convs.1", td0)
    td1 = csp("top_down_blocks.1", torch.cat([up(lat1), x1], 1))
    lat2 = base("lateral_convs.2", td1)
    out0 = csp("top_down_blocks.2", torch.cat([up(lat2), x0], 1))
    out1 = csp("bottom_up_blocks.0", torch.cat([base("downsample_convs.0", out0, 2), lat2], 1))
    out2 = csp("bottom_up_blocks.1", torch.cat([base("downsample_convs.1", out1, 2), lat1], 1))
    out3 = csp("bottom_up_blocks.2", torch.cat([base("downsample_convs.2", out2, 2), lat0], 1))
    return out0, out1, out2, out3


def test_four_level_pafpn_matches_hand_unrolled_forward():
    channels = (8, 16, 32, 64)
    neck = _randomize(YoloxPafpn(channels, depth=0.33), seed=5)
    feats = _pyramid(channels, 32)
    with torch.no_grad():
        ours, ref = neck(feats), _four_level_reference_forward(neck.state_dict(), feats)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_rvt_fpn_checkpoint_loads_strictly_and_matches(tmp_path):
    channels = (64, 128, 256)  # RVT-T in_stages [2, 3, 4]
    source = _randomize(YoloxPafpn(channels, depth=0.33), seed=3)
    official = _to_official(source.state_dict())

    # the official layout: 144 PAFPN tensors for RVT-T (docs/formats.md, RVT checkpoints: 376 = 124 backbone
    # + 144 + 108 head)
    assert len(official) == 144
    for name, shape in _official_conv_shapes(*channels).items():
        assert tuple(official[f"mdl.fpn.{name}.conv.weight"].shape) == shape, name
        assert f"mdl.fpn.{name}.bn.num_batches_tracked" in official

    # a Lightning file with backbone / head keys beside it, loaded strictly into a fresh neck
    sd = dict(official)
    sd["mdl.backbone.stages.0.downsample_cf2cl.conv.weight"] = torch.zeros(32, 20, 7, 7)
    sd["mdl.yolox_head.cls_preds.0.weight"] = torch.zeros(3, 64, 1, 1)
    path = tmp_path / "rvt.ckpt"
    torch.save({"epoch": 1, "global_step": 10, "state_dict": sd}, path)
    target = YoloxPafpn(channels, depth=0.33).eval()
    report = load_rvt_fpn(target, path)
    assert report == {"loaded": 144, "mdl.backbone.": 1, "mdl.yolox_head.": 1}
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key

    # outputs equal RVT's forward evaluated from the official keys
    feats = _pyramid(channels, 16)
    with torch.no_grad():
        ours, ref = target(feats), _rvt_reference_forward(official, feats)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)

    # the converter is pure and also reads detector-level keys (no 'mdl.')
    converted, ignored = convert_rvt_to_yolox_pafpn({k[len("mdl.") :]: v for k, v in official.items()})
    assert ignored == {} and set(converted) == set(source.state_dict())


def test_rvt_fpn_key_map_with_head_stems_and_refusals():
    channels = (64, 128, 256)
    source = _randomize(YoloxPafpn(channels, depth=0.67, out_channels=64), seed=4)
    official = _to_official(source.state_dict(), with_head_stems=True)
    assert tuple(official["mdl.yolox_head.stems.2.conv.weight"].shape) == (64, 256, 1, 1)
    assert "mdl.fpn.C3_n4.m.1.conv2.conv.weight" in official  # depth 0.67: two bottlenecks
    target = YoloxPafpn(channels, depth=0.67, out_channels=64)
    assert load_rvt_fpn(target, official)["loaded"] == len(official)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())

    with pytest.raises(ValueError, match="depth"):  # a tiny (0.33) checkpoint in a 0.67 neck
        load_rvt_fpn(YoloxPafpn(channels, depth=0.33), official)
    with pytest.raises(ValueError, match="three-level"):
        load_rvt_fpn(YoloxPafpn((32,) + channels), official)


# ------------------------------------------------------------------------------------------------
# size weights


AREAS = torch.tensor([0.0, 500.0, 1024.0, 5120.0, 9216.0, 1e6])  # 0, small, s, mid-band, m, huge


@pytest.mark.parametrize(
    "weight_type,expected",
    [
        # t = clamp((a - 1024) / 8192, 0, 1) = 0, 0, 0, 0.5, 1, 1
        ("exponential", [2.0, 2.0, 2.0, math.sqrt(2.0), 1.0, 1.0]),
        ("linear", [2.0, 2.0, 2.0, 1.5, 1.0, 1.0]),
        ("step", [2.0, 2.0, 1.5, 1.5, 1.0, 1.0]),  # COCO bins: a < s small, s <= a < m medium
    ],
)
def test_size_weights_by_hand(weight_type, expected):
    w = size_aware_weights(AREAS, 2.0, 1024.0, 9216.0, weight_type)
    assert w.dtype == torch.float32
    assert torch.allclose(w, torch.tensor(expected), atol=1e-6)


def test_size_weights_other_points_and_validation():
    # W = 3, a = 1024 + 8192 / 4 (t = 1/4): exponential 3^(3/4), linear 3 - 2/4, step medium 2
    a = torch.tensor([3072.0])
    assert torch.allclose(size_aware_weights(a, 3.0, weight_type="exponential"), torch.tensor([3.0**0.75]))
    assert torch.allclose(size_aware_weights(a, 3.0, weight_type="linear"), torch.tensor([2.5]))
    assert torch.allclose(size_aware_weights(a, 3.0, weight_type="step"), torch.tensor([2.0]))
    # continuous at both thresholds for exponential / linear; W = 1 is exactly 1
    edges = torch.tensor([1024.0 - 1e-3, 1024.0 + 1e-3, 9216.0 - 1e-3, 9216.0 + 1e-3])
    for kind in ("exponential", "linear"):
        w = size_aware_weights(edges, 2.0, weight_type=kind)
        assert abs(w[0] - w[1]) < 1e-5 and abs(w[2] - w[3]) < 1e-5
    for kind in ("exponential", "linear", "step"):
        assert torch.equal(size_aware_weights(AREAS, 1.0, weight_type=kind), torch.ones(len(AREAS)))
    with pytest.raises(ValueError, match="weight_type"):
        size_aware_weights(AREAS, weight_type="cubic")
    with pytest.raises(ValueError, match="small_threshold"):
        size_aware_weights(AREAS, small_threshold=9216.0, medium_threshold=1024.0)


# ------------------------------------------------------------------------------------------------
# mmdet head and registration

HEAD = dict(
    num_classes=3,
    in_channels=8,
    feat_channels=8,
    strides=(8, 16, 32),
    train_cfg=dict(assigner=dict(type="SimOTAAssigner", center_radius=2.5)),
)


def _heads(**size_kwargs):
    """mmdet's YOLOXHead and a SizeAwareYOLOXHead with the same (seeded) weights."""
    from mmdet.models.dense_heads import YOLOXHead

    from rat_plugins.mm.yolox_rvt import SizeAwareYOLOXHead

    torch.manual_seed(0)
    base = YOLOXHead(**HEAD)
    base.init_weights()
    ours = SizeAwareYOLOXHead(**HEAD, **size_kwargs)
    ours.load_state_dict(base.state_dict(), strict=True)
    return base.train(), ours.train()


def _batch(boxes_per_image, size=64, seed=0):
    from mmengine.structures import InstanceData

    torch.manual_seed(seed)
    feats = tuple(torch.randn(len(boxes_per_image), 8, size // s, size // s) for s in (8, 16, 32))
    gts = [
        InstanceData(bboxes=torch.tensor(b, dtype=torch.float32).reshape(-1, 4), labels=torch.arange(len(b)) % 3)
        for b in boxes_per_image
    ]
    metas = [dict(img_shape=(size, size), batch_input_shape=(size, size))] * len(boxes_per_image)
    return feats, gts, metas


def _loss(head, feats, gts, metas, use_l1=False):
    head.use_l1 = use_l1
    return head.loss_by_feat(*head(feats), gts, metas)


MIXED = [
    [[4.0, 4.0, 20.0, 24.0], [2.0, 30.0, 62.0, 62.0]],  # 320 px² (small), 1920 px² (medium)
    [[10.0, 8.0, 60.0, 60.0]],  # 2600 px²
    [],
]  # an image without objects


@pytest.mark.parametrize("normalizer", ["num_pos", "weight_sum"])
@pytest.mark.parametrize("use_l1", [False, True])
def test_unit_weight_equals_mmdet_yolox_loss(normalizer, use_l1):
    base, ours = _heads(size_aware_weight=1.0, normalizer=normalizer)
    feats, gts, metas = _batch(MIXED)
    want, got = _loss(base, feats, gts, metas, use_l1), _loss(ours, feats, gts, metas, use_l1)
    assert set(got) == set(want) == {"loss_cls", "loss_bbox", "loss_obj"} | ({"loss_l1"} if use_l1 else set())
    for key in want:
        assert want[key] > 0
        assert torch.allclose(got[key], want[key], rtol=1e-6, atol=1e-7), key


def test_small_objects_weigh_more():
    small = [[[4.0, 4.0, 20.0, 24.0], [30.0, 30.0, 54.0, 50.0]], [[10.0, 8.0, 26.0, 30.0]]]  # 320, 480, 352 px²
    feats, gts, metas = _batch(small)
    base, ours = _heads(size_aware_weight=2.0, weight_type="exponential")
    want, got = _loss(base, feats, gts, metas, True), _loss(ours, feats, gts, metas, True)
    # every positive is small: weight 2 exactly, so the positive-only terms double
    for key in ("loss_bbox", "loss_cls", "loss_l1"):
        assert want[key] > 0, key  # there are positives to weight
        assert torch.allclose(got[key], 2 * want[key], rtol=1e-5), key
    # objectness: positives double, negatives unchanged
    assert want["loss_obj"] < got["loss_obj"] < 2 * want["loss_obj"]

    # weight_sum normaliser: a weighted mean, unchanged when all weights are equal
    _, mean_head = _heads(size_aware_weight=2.0, normalizer="weight_sum")
    got_mean = _loss(mean_head, feats, gts, metas, True)
    for key in ("loss_bbox", "loss_cls", "loss_l1"):
        assert torch.allclose(got_mean[key], want[key], rtol=1e-5), key

    # only large boxes: weight 1, nothing changes
    feats, gts, metas = _batch([[[0.0, 0.0, 100.0, 100.0]], [[5.0, 5.0, 120.0, 110.0]]], size=128)
    want, got = _loss(base, feats, gts, metas), _loss(ours, feats, gts, metas)
    assert want["loss_bbox"] > 0
    assert all(torch.allclose(got[k], want[k], rtol=1e-6) for k in want)


def test_registered_names_build_and_run():
    from mmdet.registry import MODELS

    import rat_plugins.mm  # noqa: F401  (registers the adapters)

    neck = MODELS.build(dict(type="RVTPAFPN", in_channels=[8, 16, 32, 64], depth=0.33, out_channels=8))
    head = MODELS.build(
        dict(HEAD, type="SizeAwareYOLOXHead", strides=(2, 4, 8, 16), size_aware_weight=2.0, weight_type="step")
    )
    assert type(neck).__name__ == "RVTPAFPN" and type(head).__name__ == "SizeAwareYOLOXHead"
    neck.init_weights()
    head.init_weights()
    feats = tuple(torch.randn(1, c, 32 >> i, 32 >> i) for i, c in enumerate((8, 16, 32, 64)))
    outs = neck(feats)
    assert neck.out_channels == (8, 8, 8, 8) and [o.shape[-1] for o in outs] == [32, 16, 8, 4]
    _, gts, metas = _batch([[[2.0, 2.0, 10.0, 12.0]]], size=64)
    losses = head.loss_by_feat(*head(outs), gts, metas)
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_obj"}
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="weighted_losses"):
        MODELS.build(dict(type="SizeAwareYOLOXHead", **HEAD, weighted_losses=("iou",)))
