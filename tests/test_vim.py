"""ViM (rat_plugins.models.vim) against a step-by-step reference written from docs/formats.md
("ViM checkpoints"): the official key layout, DeiT-style checkpoint loading, any-size inputs,
freezing, the feature contract, the fused CPU mixer."""

import argparse
import logging
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from rat_plugins.models import vim as vim_module
from rat_plugins.models.features import FeatureInfo
from rat_plugins.models.vim import (
    VimBackbone,
    VisionMamba,
    checkpoint_filter_fn,
    convert_vim_official_to_backbone,
    load_vim_checkpoint,
    vim_tiny,
    vim_tiny_backbone,
)

E, DEPTH, PATCH, STATE = 16, 2, 8, 4  # tiny: 16 wide (inner 32, dt_rank 1), 2 layers, 8x8 patches


# ------------------------------------------------------------------------------------------------
# independent reference (float64, one sample, one token at a time), from docs/formats.md


def silu(x):
    return x * torch.sigmoid(x)


def ref_rmsnorm(x, w, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_patchify(img, w, b, p):
    """Row-major patch tokens: token r * cols + c is patch (r, c)."""
    _, H, W = img.shape
    toks = []
    for r in range(H // p):
        for c in range(W // p):
            patch = img[:, r * p : (r + 1) * p, c * p : (c + 1) * p].reshape(-1)
            toks.append(w.reshape(w.shape[0], -1) @ patch + b)
    return torch.stack(toks)


def ref_rope(x, rows, cols, pt=14, skip_first=False):
    """EVA 2D rope on the tokens: dim C/2 per axis, freqs 1/10000^(2i/(C/2)) each repeated twice,
    positions arange(n)/n*pt, row part then column part; x*cos + rotate_half(x)*sin."""
    if skip_first:
        return torch.cat([x[:1], ref_rope(x[1:], rows, cols, pt)], 0)
    C = x.shape[-1]
    half = C // 2
    freqs = torch.tensor([1.0 / 10000 ** (2 * i / half) for i in range(half // 2)], dtype=torch.float64)
    freqs = freqs.repeat_interleave(2)
    out = torch.empty_like(x)
    for r in range(rows):
        for c in range(cols):
            ang = torch.cat([r / rows * pt * freqs, c / cols * pt * freqs])
            v = x[r * cols + c]
            rot = torch.stack([-v[1::2], v[0::2]], -1).reshape(-1)  # (x1, x2) -> (-x2, x1)
            out[r * cols + c] = v * torch.cos(ang) + rot * torch.sin(ang)
    return out


def ref_direction(x, z, p, sfx):
    """One scan direction of the bimamba v2 mixer; x, z: [L, inner]."""
    L, inner = x.shape
    cw, cb = p[f"conv1d{sfx}.weight"], p[f"conv1d{sfx}.bias"]
    K = cw.shape[-1]
    xp = torch.cat([x.new_zeros(K - 1, inner), x])  # causal: left pad K-1
    u = silu(torch.stack([sum(xp[t + k] * cw[:, 0, k] for k in range(K)) + cb for t in range(L)]))
    dbl = u @ p[f"x_proj{sfx}.weight"].T
    R = p[f"dt_proj{sfx}.weight"].shape[1]
    N = (dbl.shape[1] - R) // 2
    dt, B, C = dbl[:, :R], dbl[:, R : R + N], dbl[:, R + N :]
    delta = F.softplus(dt @ p[f"dt_proj{sfx}.weight"].T + p[f"dt_proj{sfx}.bias"])
    A = -torch.exp(p["A_log" if not sfx else "A_b_log"])
    D = p[f"D{sfx}"]
    s = x.new_zeros(inner, N)
    ys = []
    for t in range(L):
        s = torch.exp(delta[t][:, None] * A) * s + (delta[t] * u[t])[:, None] * B[t][None, :]
        ys.append(s @ C[t] + D * u[t])
    return torch.stack(ys) * silu(z)


def ref_mixer(h, p, divide_out=True, gamma=None):
    """h [L, d_model]; the two directions averaged (summed without divide_out), times gamma."""
    x, z = (h @ p["in_proj.weight"].T).chunk(2, dim=-1)
    y = ref_direction(x, z, p, "") + ref_direction(x.flip(0), z.flip(0), p, "_b").flip(0)
    out = (y / 2 if divide_out else y) @ p["out_proj.weight"].T
    return out * gamma if gamma is not None else out


def ref_layers(x, sd, depth, rope=None):
    """Official block loop; returns (hidden, residual) after the last layer."""
    residual, hidden = None, x
    for i in range(depth):
        if rope is not None:
            hidden = rope(hidden)
            if residual is not None:
                residual = rope(residual)
        residual = hidden if residual is None else residual + hidden
        pre = f"layers.{i}."
        p = {k[len(pre) + len("mixer.") :]: v for k, v in sd.items() if k.startswith(pre + "mixer.")}
        hidden = ref_mixer(ref_rmsnorm(residual, sd[pre + "norm.weight"]), p)
    return hidden, residual


def ref_vim_classifier(img, sd, depth, p, rope_pt=None):
    """Middle cls token classification model: logits of one image [3, H, W]."""
    toks = ref_patchify(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], p)
    M = toks.shape[0]
    x = torch.cat([toks[: M // 2], sd["cls_token"][0], toks[M // 2 :]]) + sd["pos_embed"][0]
    rows, cols = img.shape[1] // p, img.shape[2] // p
    rope = None
    if rope_pt is not None:  # odd sequence (cls + even grid): token 0 is skipped, as officially
        rope = lambda t: ref_rope(t, rows, cols, rope_pt, skip_first=t.shape[0] % 2 == 1)  # noqa: E731
    hidden, residual = ref_layers(x, sd, depth, rope)
    feats = ref_rmsnorm(residual + hidden, sd["norm_f.weight"])
    return feats[M // 2] @ sd["head.weight"].T + sd["head.bias"]


def ref_backbone(img, sd, depth, p, pt, last_layer_process="add"):
    """Detection backbone: [C, rows, cols] map of one image whose sides are multiples of p."""
    toks = ref_patchify(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], p)
    rows, cols = img.shape[1] // p, img.shape[2] // p
    pos = sd["pos_embed"].reshape(1, pt, pt, -1).permute(0, 3, 1, 2)
    if (rows, cols) != (pt, pt):
        pos = F.interpolate(pos, size=(rows, cols), mode="bicubic", align_corners=False)
    x = toks + pos[0].permute(1, 2, 0).reshape(rows * cols, -1)
    hidden, residual = ref_layers(x, sd, depth, lambda t: ref_rope(t, rows, cols, pt))
    out = {"none": hidden, "add": hidden + residual}.get(last_layer_process)
    if out is None:
        out = ref_rmsnorm(hidden + residual, sd["norm_f.weight"])
    return out.T.reshape(-1, rows, cols)


def randomize_(model, seed=0):
    """Random, non-degenerate weights everywhere (the official init leaves zeros / ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                v = 1 + 0.2 * r
            elif "A_log" in name or "A_b_log" in name:
                v = 0.5 * r
            elif "dt_proj" in name and name.endswith("bias"):
                v = 0.5 * r - 1.0
            elif "rope." in name:
                continue
            else:
                fan_in = max(1, t[0].numel()) if t.dim() > 1 else 4
                v = r / math.sqrt(fan_in)
            t.copy_(v.to(t.dtype))
    return model


def as64(model):
    return {k: v.detach().double() for k, v in model.state_dict().items()}


def tiny_vim(**kw):
    cfg = dict(
        img_size=32,
        patch_size=PATCH,
        stride=PATCH,
        depth=DEPTH,
        embed_dim=E,
        d_state=STATE,
        num_classes=5,
        drop_path_rate=0.0,
    )
    cfg.update(kw)
    return randomize_(VisionMamba(**cfg)).eval()


def tiny_backbone(**kw):
    cfg = dict(embed_dim=E, depth=DEPTH, patch_size=PATCH, pt_hw_seq_len=4, d_state=STATE)
    cfg.update(kw)
    return randomize_(VimBackbone(**cfg), seed=1).eval()


# ------------------------------------------------------------------------------------------------
# (1) forward against the reference


@pytest.mark.parametrize("rope", [False, True])
def test_vision_mamba_matches_step_by_step_reference(rope):
    model = tiny_vim(if_rope=rope, if_rope_residual=rope, pt_hw_seq_len=14)
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(img)
        feats = model.forward_features(img)
    sd = as64(model)
    for b in range(2):
        expected = ref_vim_classifier(img[b].double(), sd, DEPTH, PATCH, rope_pt=14 if rope else None)
        assert torch.allclose(logits[b].double(), expected, rtol=1e-4, atol=1e-5), (logits[b], expected)
    assert feats.shape == (2, E)  # the middle cls token, not a mean over tokens


@pytest.mark.parametrize("last", ["none", "add", "add & norm"])
def test_backbone_matches_step_by_step_reference_non_square(last):
    model = tiny_backbone(last_layer_process=last)
    img = torch.randn(1, 3, 24, 48, generator=torch.Generator().manual_seed(4))  # grid 3x6, stored 4x4
    with torch.no_grad():
        out = model(img)
    assert out.shape == (1, E, 3, 6)
    expected = ref_backbone(img[0].double(), as64(model), DEPTH, PATCH, pt=4, last_layer_process=last)
    assert torch.allclose(out[0].double(), expected, rtol=1e-4, atol=1e-5)


def test_unsupported_official_options_raise():
    for kw in (
        dict(use_double_cls_token=True),
        dict(if_bidirectional=True),
        dict(bimamba_type="v1"),
        dict(flip_img_sequences_ratio=0.5),
        dict(final_pool_type="median"),
    ):
        with pytest.raises(ValueError):
            VisionMamba(img_size=32, patch_size=PATCH, stride=PATCH, depth=1, embed_dim=E, **kw)
    with pytest.raises(ValueError, match="img_size"):
        tiny_vim()(torch.zeros(1, 3, 40, 32))


# ------------------------------------------------------------------------------------------------
# (2) official key layout


def official_tiny_keys():
    """docs/formats.md ("ViM checkpoints"), written out: 7 top-level keys + 17 per layer."""
    keys = {
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "pos_embed",
        "cls_token",
        "head.weight",
        "head.bias",
        "norm_f.weight",
    }
    mixer = [
        "in_proj.weight",
        "conv1d.weight",
        "conv1d.bias",
        "x_proj.weight",
        "dt_proj.weight",
        "dt_proj.bias",
        "A_log",
        "D",
        "conv1d_b.weight",
        "conv1d_b.bias",
        "x_proj_b.weight",
        "dt_proj_b.weight",
        "dt_proj_b.bias",
        "A_b_log",
        "D_b",
        "out_proj.weight",
    ]
    for n in range(24):
        keys.add(f"layers.{n}.norm.weight")
        keys.update(f"layers.{n}.mixer.{m}" for m in mixer)
    return keys


OFFICIAL_TINY_SHAPES = {
    "patch_embed.proj.weight": (192, 3, 16, 16),
    "pos_embed": (1, 197, 192),
    "cls_token": (1, 1, 192),
    "head.weight": (1000, 192),
    "layers.3.mixer.in_proj.weight": (768, 192),
    "layers.3.mixer.conv1d.weight": (384, 1, 4),
    "layers.3.mixer.x_proj.weight": (44, 384),
    "layers.3.mixer.dt_proj.weight": (384, 12),
    "layers.3.mixer.A_b_log": (384, 16),
    "layers.3.mixer.D_b": (384,),
    "layers.3.mixer.out_proj.weight": (192, 384),
}


def test_vim_tiny_state_dict_is_the_official_layout():
    meta = vim_tiny(device="meta")
    sd = meta.state_dict()
    assert len(official_tiny_keys()) == 415
    assert set(sd) == official_tiny_keys()
    assert len(sd) == 415
    assert round(sum(p.numel() for p in meta.parameters()) / 1e6, 2) == 7.15
    for k, shape in OFFICIAL_TINY_SHAPES.items():
        assert tuple(sd[k].shape) == shape, k
    # an official-layout dict built independently of the model loads strictly
    official = {k: torch.randn(sd[k].shape) for k in sorted(official_tiny_keys())}
    model = vim_tiny()
    model.load_state_dict(official, strict=True)
    assert torch.equal(model.layers[23].mixer.A_b_log, official["layers.23.mixer.A_b_log"])


def test_rope_model_has_official_rope_buffers():
    model = tiny_vim(if_rope=True, pt_hw_seq_len=14)
    sd = model.state_dict()
    assert sd["rope.freqs_cos"].shape == (16, E) and sd["rope.freqs_sin"].shape == (16, E)
    fresh = VisionMamba(
        img_size=32,
        patch_size=PATCH,
        stride=PATCH,
        depth=DEPTH,
        embed_dim=E,
        d_state=STATE,
        num_classes=5,
        if_rope=True,
    )
    fresh.load_state_dict(sd, strict=True)


# ------------------------------------------------------------------------------------------------
# (3) official DeiT-style checkpoint files


def save_deit_style(path, model, extras=True):
    sd = model.state_dict()
    if not extras:
        torch.save({"model": sd}, path)
        return sd
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 3, 32, 32)).sum().backward()
    opt.step()
    torch.save(
        {
            "model": sd,
            "optimizer": opt.state_dict(),
            "lr_scheduler": {
                "t_initial": 300,
                "lr_min": 1e-5,
                "warmup_t": 5,
                "base_values": [5e-4],
                "noise_range_t": None,
                "t_in_epochs": True,
                "last_epoch": 12,
            },
            "epoch": 12,
            "model_ema": {k: v.clone() for k, v in sd.items()},
            "scaler": {
                "scale": 65536.0,
                "growth_factor": 2.0,
                "backoff_factor": 0.5,
                "growth_interval": 2000,
                "_growth_tracker": 17,
            },
            "args": argparse.Namespace(
                model="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                batch_size=128,
                lr=5e-4,
                input_size=224,
                output_dir="./output",
                seed=0,
                distributed=True,
                drop_path=0.05,
                mixup=0.8,
                opt_betas=None,
            ),
        },
        path,
    )
    return sd


def test_official_checkpoint_loads_weights_only_and_converts(tmp_path):
    src = tiny_vim(if_rope=True, if_rope_residual=True)
    path = tmp_path / "vim_tiny_pretrained.pth"
    sd = save_deit_style(path, src)
    with pytest.raises(pickle.UnpicklingError):  # the file really needs the allow-list (argparse.Namespace)
        torch.load(path, weights_only=True)
    loaded = load_vim_checkpoint(path)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)

    backbone = tiny_backbone(pt_hw_seq_len=3)  # stored grid 3x3: the 4x4 table is resized
    converted, report = convert_vim_official_to_backbone(loaded, backbone)
    assert sorted(report.dropped) == sorted(
        ["head.weight", "head.bias", "cls_token", "rope.freqs_cos", "rope.freqs_sin", "pos_embed[cls slot]"]
    )
    assert report["dropped"] is report.dropped
    assert "index 8 of 17" in report.pos_embed and "4x4 -> 3x3" in report.pos_embed
    patches = torch.cat([sd["pos_embed"][:, :8], sd["pos_embed"][:, 9:]], dim=1)  # cls slot at M//2 = 8
    grid = patches.reshape(1, 4, 4, E).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(3, 3), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 9, E)
    assert torch.allclose(converted["pos_embed"], expected)
    assert set(loaded) >= set(converted)  # pure: the input dict is untouched
    assert loaded["pos_embed"].shape == (1, 17, E)

    report = backbone.load_official_checkpoint(path)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(backbone.layers[1].mixer.A_b_log, sd["layers.1.mixer.A_b_log"])
    assert torch.allclose(backbone.pos_embed, expected)

    # the constructor argument does the same
    again = VimBackbone(
        embed_dim=E, depth=DEPTH, patch_size=PATCH, pt_hw_seq_len=3, d_state=STATE, checkpoint=str(path)
    )
    assert torch.equal(again.layers[0].mixer.in_proj.weight, sd["layers.0.mixer.in_proj.weight"])


def test_checkpoint_variants_and_errors(tmp_path, caplog):
    src = tiny_vim()
    sd = save_deit_style(tmp_path / "model_only.pth", src, extras=False)
    assert set(load_vim_checkpoint(tmp_path / "model_only.pth")) == set(sd)
    torch.save(sd, tmp_path / "bare.pth")
    assert set(load_vim_checkpoint(tmp_path / "bare.pth")) == set(sd)

    with pytest.raises(FileNotFoundError, match="not found.*checkpoint=''"):  # names the way out
        load_vim_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable ViM checkpoint"):
        load_vim_checkpoint(tmp_path / "notes.txt")
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="ViM state dict"):
        load_vim_checkpoint(tmp_path / "other.pth")

    wide = tiny_backbone(embed_dim=32)
    with pytest.raises(ValueError, match=r"embed dim 16 and depth 2, but the backbone has embed dim 32 and depth 2"):
        convert_vim_official_to_backbone(sd, wide)
    with pytest.raises(ValueError, match=r"depth 2, but the backbone has embed dim 16 and depth 3"):
        convert_vim_official_to_backbone(sd, tiny_backbone(depth=3))
    with pytest.raises(ValueError, match="embed dim 16 and depth 2.*embed dim 32 and depth 2"):  # the constructor
        VimBackbone(
            embed_dim=32,
            depth=DEPTH,
            patch_size=PATCH,
            pt_hw_seq_len=4,
            d_state=STATE,
            checkpoint=tmp_path / "model_only.pth",
        )

    # a [1, M, C] table (no cls token) is taken as is; missing keys are logged, not silent
    no_cls = {k: v for k, v in sd.items() if k not in ("cls_token", "layers.1.mixer.D_b")}
    no_cls["pos_embed"] = sd["pos_embed"][:, :16]
    torch.save({"model": no_cls}, tmp_path / "no_cls.pth")
    backbone = tiny_backbone()
    with caplog.at_level(logging.WARNING, logger="rat_plugins.models.vim"):
        report = backbone.load_official_checkpoint(tmp_path / "no_cls.pth")
    assert report.missing == ["layers.1.mixer.D_b"]
    assert "layers.1.mixer.D_b" in caplog.text
    assert torch.equal(backbone.pos_embed, no_cls["pos_embed"])
    assert "no cls slot" in report.pos_embed


def official_backbone_state(embed=32, depth=2, grid=4):
    """A classification state dict in the official key layout (cls slot at M // 2, head, rope) made
    from a backbone's weights, and that backbone."""
    src = VimBackbone(embed_dim=embed, depth=depth, pt_hw_seq_len=grid)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    m = grid * grid
    cls_entry = torch.full((1, 1, embed), 7.0)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, : m // 2], cls_entry, state["pos_embed"][:, m // 2 :]], 1)
    state.update(
        {
            "cls_token": torch.zeros(1, 1, embed),
            "head.weight": torch.zeros(10, embed),
            "head.bias": torch.zeros(10),
            "rope.freqs_cos": torch.zeros(m, embed),
            "rope.freqs_sin": torch.zeros(m, embed),
        }
    )
    return src, state


def test_official_checkpoint_into_backbone_logs_its_report_and_reproduces_the_source(tmp_path, caplog):
    src, state = official_backbone_state()
    path = tmp_path / "vim_tiny_pretrained.pth"
    torch.save(
        {
            "model": state,
            "optimizer": {"state": {}},
            "lr_scheduler": {"last_epoch": 3},
            "epoch": 299,
            "model_ema": None,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="vim_tiny", lr=5e-4),
        },
        path,
    )
    with caplog.at_level(logging.INFO):
        net = VimBackbone(embed_dim=32, depth=2, pt_hw_seq_len=4, checkpoint=path)
    assert "dropped" in caplog.text and "cls_token" in caplog.text
    report = net.load_official_checkpoint(path)
    assert set(report["dropped"]) == {
        "cls_token",
        "head.weight",
        "head.bias",
        "rope.freqs_cos",
        "rope.freqs_sin",
        "pos_embed[cls slot]",
    }
    assert report["missing"] == [] and report["unexpected"] == []
    torch.testing.assert_close(net.pos_embed, src.pos_embed)  # cls slot removed from the middle
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(net(x), src(x))


def test_pos_embed_resized_to_a_larger_pretraining_grid(tmp_path):
    _, state = official_backbone_state(grid=4)
    path = tmp_path / "grid4.pth"
    torch.save(state, path)  # a bare state dict
    net = VimBackbone(embed_dim=32, depth=2, pt_hw_seq_len=6, checkpoint=path)
    assert net.pos_embed.shape == (1, 36, 32)


def test_round_trip_classifier_weights_into_backbone():
    """No-cls-token rope ViM (official detection pretraining layout) == backbone 'add & norm'."""
    src = tiny_vim(if_cls_token=False, if_rope=True, if_rope_residual=True, pt_hw_seq_len=4, final_pool_type="all")
    backbone = VimBackbone(
        embed_dim=E, depth=DEPTH, patch_size=PATCH, pt_hw_seq_len=4, d_state=STATE, last_layer_process="add & norm"
    ).eval()
    converted, report = convert_vim_official_to_backbone(src.state_dict(), backbone)
    backbone.load_state_dict(converted, strict=True)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = src.forward_features(img)  # [2, 16, E], norm_f(hidden + residual)
        fmap = backbone(img)
    assert torch.allclose(fmap, tokens.transpose(1, 2).reshape(2, E, 4, 4), atol=1e-5)


def test_checkpoint_filter_fn_resizes_for_another_image_size():
    src = tiny_vim(if_rope=True)
    big = VisionMamba(
        img_size=48,
        patch_size=PATCH,
        stride=PATCH,
        depth=DEPTH,
        embed_dim=E,
        d_state=STATE,
        num_classes=5,
        if_rope=True,
    )
    big.load_state_dict(checkpoint_filter_fn({"model": src.state_dict()}, big), strict=True)
    assert big.pos_embed.shape == (1, 37, E)
    assert torch.equal(big.pos_embed[:, 18], src.pos_embed[:, 8])  # the cls slot moves to the new middle


# ------------------------------------------------------------------------------------------------
# (4) any size / aspect ratio


@pytest.mark.parametrize("d_state", [STATE, 16])  # 16: the fused CPU mixer
@pytest.mark.parametrize("hw", [(64, 96), (80, 48), (50, 70), (16, 16), (17, 33)])
def test_backbone_any_aspect_ratio(hw, d_state):
    model = VimBackbone(embed_dim=E, depth=1, patch_size=16, pt_hw_seq_len=4, d_state=d_state).eval()
    H, W = hw
    with torch.no_grad():
        out = model(torch.randn(2, 3, H, W))
    assert out.shape == (2, E, math.ceil(H / 16), math.ceil(W / 16))
    assert torch.isfinite(out).all()
    assert model.patch_size == 16 and model.embed_dim == E


def test_backbone_pads_bottom_right_and_resizes_pos_embed():
    model = tiny_backbone()
    img = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        out = model(img)
        padded = model(F.pad(img, (0, 2, 0, 6)))  # 56 x 72: the same tokens
    assert out.shape == (1, E, 7, 9)
    assert torch.allclose(out, padded)
    stored = model.pos_embed.reshape(1, 4, 4, E).permute(0, 3, 1, 2)
    expected = F.interpolate(stored, size=(7, 9), mode="bicubic", align_corners=False)
    assert torch.allclose(model._pos_embed_for((7, 9)), expected.permute(0, 2, 3, 1).reshape(1, 63, E))
    assert model._pos_embed_for((4, 4)) is model.pos_embed


# ------------------------------------------------------------------------------------------------
# (5) frozen, (6) last_layer_process, (7) forward + backward, (8) the feature contract


def test_frozen():
    model = VimBackbone(embed_dim=E, depth=DEPTH, patch_size=PATCH, pt_hw_seq_len=4, d_state=STATE, frozen=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    x = torch.randn(1, 3, 32, 40, requires_grad=True)
    out = model(x)
    assert out.grad_fn is None and not out.requires_grad


def test_freeze_is_a_deprecated_alias_of_frozen(monkeypatch):
    monkeypatch.setattr(vim_module, "_warned_freeze_alias", False)
    kw = dict(embed_dim=E, depth=1, patch_size=PATCH, pt_hw_seq_len=4, d_state=STATE)
    with pytest.warns(FutureWarning, match="`freeze` is deprecated, use `frozen`"):
        old = VimBackbone(freeze=True, **kw)
    assert old.frozen and not any(p.requires_grad for p in old.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert not VimBackbone(freeze=False, **kw).frozen
    with pytest.raises(ValueError, match="pass only frozen"):
        VimBackbone(frozen=True, freeze=False, **kw)


def test_feature_contract():
    model = tiny_backbone()
    assert model.feature_info == [FeatureInfo("last_feat", PATCH, E)]
    img = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        features = model.forward_features(img)
        fmap = model(img)
    assert list(features) == ["last_feat"]
    assert torch.equal(features["last_feat"], fmap) and fmap.shape == (2, E, 3, 5)


def test_last_layer_process_variants():
    outs = {}
    base = tiny_backbone(last_layer_process="add & norm")
    img = torch.randn(1, 3, 32, 32)
    for last in ("none", "add", "add & norm"):
        m = VimBackbone(
            embed_dim=E, depth=DEPTH, patch_size=PATCH, pt_hw_seq_len=4, d_state=STATE, last_layer_process=last
        ).eval()
        m.load_state_dict(base.state_dict(), strict=True)  # same keys in every variant
        assert m.norm_f.weight.requires_grad == (last == "add & norm")
        with torch.no_grad():
            outs[last] = m(img)
    assert not torch.allclose(outs["none"], outs["add"])
    assert not torch.allclose(outs["add & norm"], outs["add"])
    add = outs["add"].permute(0, 2, 3, 1)
    normed = add * torch.rsqrt(add.pow(2).mean(-1, keepdim=True) + 1e-5) * base.norm_f.weight
    assert torch.allclose(outs["add & norm"], normed.permute(0, 3, 1, 2), atol=1e-6)
    with pytest.raises(ValueError, match="last_layer_process"):
        VimBackbone(embed_dim=E, depth=1, last_layer_process="norm")


def test_backbone_forward_backward():
    model = VimBackbone(
        embed_dim=E, depth=DEPTH, patch_size=PATCH, pt_hw_seq_len=4, d_state=STATE, drop_path_rate=0.1
    ).train()
    x = torch.randn(2, 3, 40, 24)
    out = model(x)
    assert out.shape == (2, E, 5, 3)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if name == "norm_f.weight":  # unused (and frozen) with last_layer_process='add'
            assert not p.requires_grad and p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.pos_embed.grad.abs().sum() > 0 and model.layers[1].mixer.A_b_log.grad.abs().sum() > 0


def test_vision_mamba_forward_backward():
    model = tiny_vim().train()
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5)
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_factories():
    assert vim_tiny_backbone(depth=1).embed_dim == 192
    assert vim_tiny(device="meta").embed_dim == 192


# ------------------------------------------------------------------------------------------------
# (5) the fused CPU inference path of the mixer (d_state 16, float32, no autograd)

from rat_plugins.models.ops import selective_scan as scan_ops  # noqa: E402
from rat_plugins.models.vim import BiMambaV2  # noqa: E402

needs_cpp = pytest.mark.skipif(
    not scan_ops.available_backends()["cpp"], reason="the C++ scan kernel cannot be built on this machine"
)


@needs_cpp
@pytest.mark.parametrize("L", [1, 2, 5, 33])
@pytest.mark.parametrize("variant", [{}, {"if_divide_out": False, "init_layer_scale": 0.5}])
def test_fused_mixer_matches_step_by_step_reference(L, variant):
    mixer = randomize_(BiMambaV2(d_model=E, d_state=16, **variant), seed=L).eval()  # inner 32: two blocks
    p = {k: v.detach().double() for k, v in mixer.state_dict().items()}
    h = torch.randn(3, L, E, generator=torch.Generator().manual_seed(L))
    with torch.no_grad():
        out = mixer(h)
    assert mixer._fused_cpu.cache is not None, "the fused path did not run"
    for b in range(3):
        expected = ref_mixer(h[b].double(), p, variant.get("if_divide_out", True), p.get("gamma"))
        assert torch.allclose(out[b].double(), expected, rtol=1e-5, atol=1e-5), (out[b] - expected).abs().max()


@needs_cpp
def test_fused_mixer_without_conv_bias_and_under_inference_mode(monkeypatch):
    mixer = randomize_(BiMambaV2(d_model=E, d_state=16, conv_bias=False), seed=7).eval()
    h = torch.randn(2, 9, E)
    with torch.inference_mode():
        fused = mixer(h)
    monkeypatch.setenv(scan_ops.BACKEND_ENV, "torch")  # the unfused path
    with torch.no_grad():
        plain = mixer(h)
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-6)


@needs_cpp
def test_fused_path_only_without_autograd_and_its_cache_follows_the_parameters(monkeypatch):
    model = tiny_vim(d_state=16)
    mixer = model.layers[0].mixer
    img = torch.randn(2, 3, 32, 32)
    # with autograd the unfused, differentiable path runs and the cache is never built
    model(img).sum().backward()
    assert mixer._fused_cpu.cache is None and mixer.A_b_log.grad is not None
    with torch.no_grad():
        first = model(img)
    assert mixer._fused_cpu.cache is not None
    # an optimizer-style in-place update and a load_state_dict must both reach the fused path
    with torch.no_grad():
        mixer.x_proj_b.weight.mul_(1.5)
        mixer.A_log.add_(0.3)
        updated = model(img)
    model.load_state_dict(tiny_vim(d_state=16).state_dict() | {"layers.1.mixer.D_b": torch.full((2 * E,), 3.0)})
    with torch.no_grad():
        loaded = model(img)
    monkeypatch.setenv(scan_ops.BACKEND_ENV, "torch")
    with torch.no_grad():
        plain_loaded = model(img)
        model.load_state_dict(tiny_vim(d_state=16).state_dict())  # the original weights
        with torch.no_grad():
            mixer.x_proj_b.weight.mul_(1.5)
            mixer.A_log.add_(0.3)
        plain_updated = model(img)
    assert not torch.allclose(first, updated, rtol=1e-3)
    slow = BiMambaV2(d_model=E, d_state=16, use_fast_path=False).eval()
    with torch.no_grad():
        slow(torch.randn(1, 4, E))
    assert slow._fused_cpu.cache is None
    assert torch.allclose(updated, plain_updated, rtol=1e-5, atol=1e-6)
    assert torch.allclose(loaded, plain_loaded, rtol=1e-5, atol=1e-6)


@needs_cpp
def test_fused_scan_rejects_positive_A():
    ext = scan_ops.load_cpp_extension(strict=True)
    b, L, di, R = 1, 4, 16, 2
    args = [
        torch.zeros(b, L, 2 * di),
        torch.zeros(2, b, L, di),
        torch.zeros(2, b * L, R + 32),
        torch.zeros(2, R, di),
        torch.full((2, 16, di), 0.5),
        torch.zeros(2, di),
        torch.zeros(2, di),
        torch.empty(b, L, di),
    ]
    with pytest.raises(RuntimeError, match="A must be <= 0"):
        ext.bimamba_scan(*args, 0.5)


# ------------------------------------------------------------------------------------------------
# (9) the mm and detectron2 adapters


def test_mm_adapter_returns_the_map_as_a_1_tuple_in_both_registries(monkeypatch):
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS

    from rat_plugins.mm.vim import ViM, ViMBackbone

    assert ViMBackbone is ViM  # the former class name
    cfg = dict(type="ViM", embed_dim=E, depth=1, patch_size=PATCH, pt_hw_seq_len=4, d_state=STATE, frozen=True)
    for registry in (MMDET_MODELS, MMSEG_MODELS):
        model = registry.build(dict(cfg))
        assert type(model) is ViM and model.net.frozen
        img = torch.randn(2, 3, 24, 40)
        (fmap,) = model(img)
        assert torch.equal(fmap, model.net(img)) and fmap.shape == (2, E, 3, 5)
    monkeypatch.setattr(vim_module, "_warned_freeze_alias", False)
    with pytest.warns(FutureWarning, match="use `frozen`"):  # configs written with freeze= still build
        assert MMDET_MODELS.build({**cfg, "frozen": False, "freeze": True}).net.frozen


def test_detectron2_adapter_names_its_map_from_the_feature_info(monkeypatch):
    from detectron2.config import get_cfg
    from detectron2.modeling import ShapeSpec

    from rat_plugins.detectron2.vim import ViM, add_vim_config, build_vim_backbone

    kw = dict(embed_dim=E, depth=1, patch_size=PATCH, pt_hw_seq_len=4, d_state=STATE)
    backbone = ViM(**kw)
    shape = backbone.output_shape()
    assert list(shape) == ["last_feat"] and (shape["last_feat"].stride, shape["last_feat"].channels) == (PATCH, E)
    assert backbone.size_divisibility == PATCH
    img = torch.randn(1, 3, 24, 40)
    out = backbone(img)
    assert list(out) == ["last_feat"] and torch.equal(out["last_feat"], backbone.net(img))
    assert list(ViM(out_feature=0, **kw).output_shape()) == ["last_feat"]  # by 0-based index
    with pytest.raises(ValueError, match="unknown feature 'p4'"):
        ViM(out_feature="p4", **kw)

    cfg = get_cfg()
    add_vim_config(cfg)
    cfg.MODEL.VIM.EMBED_DIM, cfg.MODEL.VIM.DEPTH = 16, 1
    assert build_vim_backbone(cfg, ShapeSpec(channels=3)).net.frozen  # FROZEN, default True
    cfg.MODEL.VIM.FREEZE = False  # the deprecated key still decides
    monkeypatch.setattr(vim_module, "_warned_freeze_alias", False)
    with pytest.warns(FutureWarning, match="use `frozen`"):
        assert not build_vim_backbone(cfg, ShapeSpec(channels=3)).net.frozen
