"""timm / DeiT ViT weights -> mmseg VisionTransformer (rat_plugins.models.vit_convert)."""

import argparse
import fractions

import pytest
import torch
import torch.nn.functional as F

from rat_plugins.models.vit_convert import convert_timm_vit_to_mmseg, load_timm_vit_checkpoint

E, DEPTH, PATCH, GRID = 32, 2, 8, 4  # tiny ViT: 32 wide, 2 blocks, 8x8 patches, 32x32 input
TIMM_BLOCK = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
]
# The mmseg names, written out from mmseg/models/backbones/vit.py + mmcv MultiheadAttention / FFN.
MM_BLOCK = [
    "ln1.weight",
    "ln1.bias",
    "attn.attn.in_proj_weight",
    "attn.attn.in_proj_bias",
    "attn.attn.out_proj.weight",
    "attn.attn.out_proj.bias",
    "ln2.weight",
    "ln2.bias",
    "ffn.layers.0.0.weight",
    "ffn.layers.0.0.bias",
    "ffn.layers.1.weight",
    "ffn.layers.1.bias",
]
TIMM_TOP = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
MM_TOP = [
    "cls_token",
    "pos_embed",
    "patch_embed.projection.weight",
    "patch_embed.projection.bias",
    "ln1.weight",
    "ln1.bias",
]


def _shape(key, e, grid, patch):
    if key == "cls_token":
        return (1, 1, e)
    if key == "pos_embed":
        return (1, grid * grid + 1, e)
    if key == "patch_embed.proj.weight":
        return (e, 3, patch, patch)
    if key.endswith("qkv.weight"):
        return (3 * e, e)
    if key.endswith("qkv.bias"):
        return (3 * e,)
    if key.endswith("fc1.weight"):
        return (4 * e, e)
    if key.endswith("fc1.bias"):
        return (4 * e,)
    if key.endswith("fc2.weight"):
        return (e, 4 * e)
    if key.endswith("proj.weight"):
        return (e, e)
    return (e,)


def timm_state(e=E, depth=DEPTH, grid=GRID, patch=PATCH, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = TIMM_TOP + [f"blocks.{i}.{k}" for i in range(depth) for k in TIMM_BLOCK]
    if device == "meta":
        return {k: torch.empty(_shape(k, e, grid, patch), device="meta") for k in keys}
    return {k: torch.randn(_shape(k, e, grid, patch), generator=g) for k in keys}


def test_key_mapping_matches_mmseg_names():
    sd = timm_state()
    out, report = convert_timm_vit_to_mmseg(sd, num_layers=DEPTH, embed_dims=E, grid_hw=(GRID, GRID))
    expected = dict(zip(TIMM_TOP, MM_TOP))
    expected.update({f"blocks.{i}.{a}": f"layers.{i}.{b}" for i in range(DEPTH) for a, b in zip(TIMM_BLOCK, MM_BLOCK)})
    assert sorted(out) == sorted(expected.values())
    for src, dst in expected.items():
        assert torch.equal(out[dst], sd[src]), (src, dst)
    assert report.converted == len(expected) and not report.missing and not report.unexpected
    assert report.pos_embed_resized is None
    assert sorted(sd) == sorted(timm_state())  # the input is left alone


def test_extras_ignored_unexpected_and_missing_reported():
    sd = timm_state()
    extras = {
        "head.weight": torch.zeros(10, E),
        "head.bias": torch.zeros(10),
        "fc_norm.weight": torch.ones(E),
        "mask_token": torch.zeros(1, 1, E),
        "decoder_embed.weight": torch.zeros(16, E),
        "decoder_blocks.0.norm1.weight": torch.ones(16),
        "decoder_pos_embed": torch.zeros(1, 17, 16),
    }
    sd.update(extras)
    sd["blocks.0.ls1.gamma"] = torch.ones(E)
    del sd["norm.weight"]
    out, report = convert_timm_vit_to_mmseg(sd, num_layers=DEPTH, embed_dims=E, grid_hw=(GRID, GRID))
    assert sorted(report.ignored) == sorted(extras)
    assert report.unexpected == ["blocks.0.ls1.gamma"]
    assert report.missing == ["norm.weight"]
    assert "ln1.weight" not in out and not any(k.startswith(("head", "decoder", "mask", "fc_norm")) for k in out)
    text = str(report)
    assert "ignored 7 non-encoder keys" in text and "missing 1 keys: norm.weight" in text
    assert "unexpected 1 keys (not converted): blocks.0.ls1.gamma" in text


def test_pos_embed_interpolated_with_cls_slot_kept():
    sd = timm_state()
    out, report = convert_timm_vit_to_mmseg(sd, num_layers=DEPTH, embed_dims=E, grid_hw=(6, 8), antialias=False)
    pos = out["pos_embed"]
    assert pos.shape == (1, 1 + 6 * 8, E)
    assert torch.equal(pos[:, 0], sd["pos_embed"][:, 0])
    grid = sd["pos_embed"][:, 1:].reshape(1, GRID, GRID, E).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(pos[:, 1:], ref)
    assert report.pos_embed_resized == ((GRID, GRID), (6, 8))
    assert "from a 4x4 to a 6x8 patch grid" in str(report)


def _timm_vit(img_size, **kw):
    import timm

    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size,
        patch_size=16,
        embed_dim=E,
        depth=DEPTH,
        num_heads=2,
        mlp_ratio=4,
        qkv_bias=True,
        num_classes=5,
        **kw,
    ).eval()


def test_pos_embed_resampled_as_timm_loads_at_another_size():
    """By default the table is resampled as timm's checkpoint_filter_fn does (bicubic, antialiased)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    sd = _timm_vit(224).state_dict()  # 14x14 grid
    timm_sd = checkpoint_filter_fn(sd, _timm_vit((320, 256)))  # 20x16
    out, report = convert_timm_vit_to_mmseg(sd, num_layers=DEPTH, embed_dims=E, grid_hw=(20, 16))
    assert out["pos_embed"].shape == (1, 1 + 20 * 16, E)
    torch.testing.assert_close(out["pos_embed"], timm_sd["pos_embed"], rtol=0, atol=0)
    plain, _ = convert_timm_vit_to_mmseg(sd, num_layers=DEPTH, embed_dims=E, grid_hw=(20, 16), antialias=False)
    assert not torch.allclose(plain["pos_embed"], out["pos_embed"], atol=1e-3)  # the choice matters
    assert report.pos_embed_antialiased and "from a 14x14 to a 20x16 patch grid (antialiased" in str(report)


def test_architecture_mismatch_names_both_shapes():
    vit_l = timm_state(e=1024, depth=24, grid=14, patch=16, device="meta")  # shapes only, no memory
    with pytest.raises(ValueError) as e:
        convert_timm_vit_to_mmseg(vit_l, num_layers=12, embed_dims=768, grid_hw=(14, 14))
    msg = str(e.value)
    assert "checkpoint is embed 1024, 24 layers" in msg and "model is embed 768, 12 layers" in msg
    with pytest.raises(ValueError, match="patch 16.*patch 8"):
        convert_timm_vit_to_mmseg(
            timm_state(e=64, depth=2, grid=14, patch=16, device="meta"),
            num_layers=2,
            embed_dims=64,
            grid_hw=(14, 14),
            patch_size=8,
        )


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "deit_with_args", "ddp_prefix"])
def test_load_checkpoint_layouts(tmp_path, wrap):
    sd = timm_state()
    obj = {
        "bare": sd,
        "model": {"model": sd},
        "state_dict": {"state_dict": sd, "epoch": 3},
        "deit_with_args": {"model": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-3, model="vit_base")},
        "ddp_prefix": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    torch.save(obj, tmp_path / "w.pth")
    loaded = load_timm_vit_checkpoint(tmp_path / "w.pth")
    assert sorted(loaded) == sorted(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_timm_vit_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable PyTorch checkpoint"):
        load_timm_vit_checkpoint(tmp_path / "text.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match="holds no ViT state dict.*epoch, lr"):
        load_timm_vit_checkpoint(tmp_path / "meta.pth")
    torch.save({"model": fractions.Fraction(1, 3)}, tmp_path / "pickled.pth")  # a class outside the allow-list
    refused = "objects of class fractions.Fraction, which torch.load.weights_only=True. refuses"
    with pytest.raises(ValueError, match=refused):
        load_timm_vit_checkpoint(tmp_path / "pickled.pth")


# ----------------------------------------------------------------------------- against the real models


def _mmseg_vit(img=32, **kw):
    from mmseg.models.backbones import VisionTransformer

    args = dict(
        img_size=img,
        patch_size=PATCH,
        embed_dims=E,
        num_layers=DEPTH,
        num_heads=2,
        mlp_ratio=4,
        out_indices=(0, DEPTH - 1),
        qkv_bias=True,
        patch_bias=True,
        final_norm=True,
        norm_cfg=dict(type="LN", eps=1e-6),
        with_cls_token=True,
    )
    args.update(kw)
    vit = VisionTransformer(**args)
    vit.eval()  # mmseg's VisionTransformer.train() returns None
    return vit


def test_round_trip_through_timm_layout(tmp_path):
    """mmseg weights -> renamed to timm layout (inverse table) -> file -> convert -> strict load -> equal."""
    torch.manual_seed(0)
    src = _mmseg_vit()
    src.init_weights()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.02 * torch.randn_like(p))  # LayerNorm / bias values away from their defaults
    inverse = dict(zip(MM_TOP, TIMM_TOP))
    inverse.update({f"layers.{i}.{b}": f"blocks.{i}.{a}" for i in range(DEPTH) for a, b in zip(TIMM_BLOCK, MM_BLOCK)})
    timm_sd = {inverse[k]: v.clone() for k, v in src.state_dict().items()}
    torch.save({"model": timm_sd, "args": argparse.Namespace(arch="vit")}, tmp_path / "vfm.pth")

    converted, report = convert_timm_vit_to_mmseg(
        load_timm_vit_checkpoint(tmp_path / "vfm.pth"), num_layers=DEPTH, embed_dims=E, grid_hw=(GRID, GRID)
    )
    dst = _mmseg_vit()
    dst.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(src(x), dst(x)):
            assert torch.equal(a, b)
    assert report.converted == len(src.state_dict())

    # a larger input: the converter's bicubic resize without antialiasing equals mmseg's own resize_pos_embed
    big, _ = convert_timm_vit_to_mmseg(timm_sd, num_layers=DEPTH, embed_dims=E, grid_hw=(6, 6), antialias=False)
    ref = src.resize_pos_embed(src.pos_embed.detach(), (6, 6), (GRID, GRID), "bicubic")
    assert torch.allclose(big["pos_embed"], ref, atol=1e-6)
    _mmseg_vit(img=48).load_state_dict(big, strict=True)


def test_genuine_timm_model_matches():
    """A real timm VisionTransformer's state dict gives the same final features in mmseg."""
    import timm

    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=PATCH, embed_dim=E, depth=DEPTH, num_heads=2, mlp_ratio=4, qkv_bias=True, num_classes=5
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    converted, report = convert_timm_vit_to_mmseg(
        ref.state_dict(), num_layers=DEPTH, embed_dims=E, grid_hw=(GRID, GRID)
    )
    assert report.ignored == ["head.weight", "head.bias"] and not report.unexpected and not report.missing
    vit = _mmseg_vit()
    vit.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = ref.forward_features(x)[:, 1:]  # after timm's final norm, cls token dropped
        ours = vit(x)[-1]  # last block + ln1 (final_norm)
    assert torch.allclose(ours.flatten(2).transpose(1, 2), tokens, atol=1e-5)


def test_timm_vit_at_another_size_gives_timm_features(tmp_path):
    """A 224-trained timm ViT loaded by the SETR encoder at 320x256 gives what timm itself gives there."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from rat_plugins.mm.setr import FrozenVisionTransformer

    torch.manual_seed(0)
    trained = _timm_vit(224)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save({"model": trained.state_dict()}, tmp_path / "vit224.pth")

    ref = _timm_vit((320, 256))
    ref.load_state_dict(checkpoint_filter_fn(torch.load(tmp_path / "vit224.pth", weights_only=True), ref))
    ours = FrozenVisionTransformer(
        img_size=(320, 256),
        patch_size=16,
        embed_dims=E,
        num_layers=DEPTH,
        num_heads=2,
        mlp_ratio=4,
        out_indices=(DEPTH - 1,),
        qkv_bias=True,
        patch_bias=True,
        final_norm=True,
        norm_cfg=dict(type="LN", eps=1e-6),
        with_cls_token=True,
        pretrained_timm=str(tmp_path / "vit224.pth"),
    )
    ours.init_weights()
    x = torch.randn(2, 3, 320, 256)
    with torch.no_grad():
        tokens = ref.forward_features(x)[:, 1:]  # last block + final norm, cls token dropped
        (fmap,) = ours(x)
    assert fmap.shape == (2, E, 20, 16)
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), tokens, rtol=1e-4, atol=1e-5)
