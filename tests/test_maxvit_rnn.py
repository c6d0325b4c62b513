"""RVT's MaxViT-RNN: geometry, the official semantics (checked by hand), state carrying, checkpoints,
and the mmdet / detectron2 adapters."""

import fractions
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from rat_plugins.models.features import FeatureInfo
from rat_plugins.models.maxvit_rnn import (
    ConvLstmCell,
    MaxViTRNN,
    MaxVitRnn,
    PartitionAttentionBlock,
    PartitionSelfAttention,
    load_rvt_checkpoint,
    maxvit_rnn_base,
    maxvit_rnn_small,
    maxvit_rnn_tiny,
    rvt_stage_names,
)

torch.set_num_threads(1)

TINY = dict(embed_dim=8, dim_head=8)  # stage dims 8/16/32/64, heads 1/2/4/8
NAMES = ["stage1", "stage2", "stage3", "stage4"]  # the feature names, RVT's 1-based stage numbers


def _stage(s):
    """Name of RVT's stage ``s`` (1-based)."""
    return NAMES[s - 1]


def _model(seed=0, randomize=True, **kwargs):
    """A tiny model; ``randomize`` replaces every parameter (LayerScale 1e-5 would hide attention)."""
    torch.manual_seed(seed)
    m = MaxViTRNN(**{**TINY, **kwargs}).eval()
    if randomize:
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.3)
    return m


def _official_keys(depths=(1, 1, 1, 1)):
    """RVT's backbone keys, written out from docs/formats.md, RVT checkpoints (not read off the model)."""
    block = [
        "self_attn.qkv.weight",
        "self_attn.qkv.bias",
        "self_attn.proj.weight",
        "self_attn.proj.bias",
        "ls1.gamma",
        "norm2.weight",
        "norm2.bias",
        "mlp.net.0.0.weight",
        "mlp.net.0.0.bias",
        "mlp.net.2.weight",
        "mlp.net.2.bias",
        "ls2.gamma",
    ]
    keys = []
    for s, depth in enumerate(depths):
        p = f"stages.{s}."
        keys += [
            p + "downsample_cf2cl.conv.weight",
            p + "downsample_cf2cl.norm.weight",
            p + "downsample_cf2cl.norm.bias",
        ]
        for b in range(depth):
            for kind in ("att_window", "att_grid"):
                q = f"{p}att_blocks.{b}.{kind}."
                if not (b == 0 and kind == "att_window"):  # the first window block of a stage: no norm1
                    keys += [q + "norm1.weight", q + "norm1.bias"]
                keys += [q + k for k in block]
        keys += [p + "lstm.conv1x1.weight", p + "lstm.conv1x1.bias"]
    return keys


def _lightning_checkpoint(path, model, extra_objects=None):
    """An RVT Lightning file: prefixed backbone + some neck / head keys + Lightning bookkeeping."""
    sd = {"mdl.backbone." + k: v.clone() for k, v in model.state_dict().items()}
    sd["mdl.fpn.lateral_convs.0.conv.weight"] = torch.randn(4, 4, 1, 1)
    sd["mdl.fpn.lateral_convs.0.bn.running_mean"] = torch.zeros(4)
    sd["mdl.yolox_head.cls_preds.0.weight"] = torch.randn(8, 4, 1, 1)
    ckpt = {
        "epoch": 7,
        "global_step": 12345,
        "pytorch-lightning_version": "1.8.6",
        "state_dict": sd,
        "loops": {"fit_loop": {"epoch_loop.batch_progress": {"total": {"ready": 12345, "completed": 12345}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val/AP', 'mode': 'max'}": {
                "best_model_score": torch.tensor(0.47),
                "best_model_path": "/ckpt/epoch=7.ckpt",
            }
        },
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "params": [0]}],
            }
        ],
        "lr_schedulers": [{"total_steps": 400000, "_last_lr": [2e-4], "last_epoch": 12345}],
    }
    ckpt.update(extra_objects or {})
    torch.save(ckpt, path)
    return path


# ------------------------------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize("patch", [2, 4])
def test_stage_strides_and_channels(patch):
    m = _model(patch_size=patch, partition_split=1, randomize=False)
    feats, states = m(torch.randn(2, 20, 64, 64))
    assert m.strides == tuple(patch * 2**s for s in range(4))
    assert list(feats) == NAMES and len(states) == 4
    assert m.feature_info == [FeatureInfo(f"stage{s}", patch * 2 ** (s - 1), 8 * 2 ** (s - 1)) for s in range(1, 5)]
    for s in range(1, 5):
        stride = patch * 2 ** (s - 1)
        assert feats[_stage(s)].shape == (2, 8 * 2 ** (s - 1), 64 // stride, 64 // stride)
        assert states[s - 1][0] is feats[_stage(s)] and states[s - 1][1].shape == feats[_stage(s)].shape
    assert m.forward_features(torch.zeros(1, 20, 64, 64))[0].keys() == feats.keys()


def test_class_name_alias_and_rvt_stage_names():
    assert MaxVitRnn is MaxViTRNN
    assert rvt_stage_names([2, 3, 4]) == ("stage2", "stage3", "stage4")


@pytest.mark.parametrize(
    "patch, split, hw, padded, partition",
    [
        (4, 2, (720, 1280), (768, 1280), (12, 20)),  # eTraM / 1Mpx with RVT's rule (32 * split)
        (4, 1, (240, 304), (256, 320), (8, 10)),  # Gen1 with RVT's rule
        (2, 2, (720, 1280), (768, 1280), (12, 20)),  # patch 2, RVT's rule: the partition of patch 4
        (2, 4, (720, 1280), (768, 1280), (6, 10)),
        (2, 1, (50, 70), (64, 96), (2, 3)),
        (4, 2, (50, 70), (64, 128), (1, 2)),
    ],
)
def test_padding_and_partition_rule(patch, split, hw, padded, partition):
    m = MaxViTRNN(**TINY, patch_size=patch, partition_split=split)
    assert m.partition_rule == "rvt" and m.padded_size(*hw) == padded
    assert m.partition_size(*hw) == partition


@pytest.mark.parametrize(
    "patch, split, hw, padded, partition",
    [
        (2, 2, (720, 1280), (736, 1280), (23, 40)),  # deepest stride 16: multiple 32, windows of 4x the area
        (2, 4, (720, 1280), (768, 1280), (12, 20)),
        (2, 1, (50, 70), (64, 80), (4, 5)),
        (4, 2, (720, 1280), (768, 1280), (12, 20)),  # the same as RVT's at patch 4
    ],
)
def test_the_deepest_stride_partition_rule(patch, split, hw, padded, partition):
    m = MaxViTRNN(**TINY, patch_size=patch, partition_split=split, partition_rule="deepest_stride")
    assert m.padded_size(*hw) == padded and m.partition_size(*hw) == partition


def test_the_partition_rule_changes_no_weight():
    rvt = MaxViTRNN(**TINY, patch_size=2, partition_split=1)
    other = MaxViTRNN(**TINY, patch_size=2, partition_split=1, partition_rule="deepest_stride")
    other.load_state_dict(rvt.state_dict(), strict=True)
    with pytest.raises(ValueError, match="partition_rule must be one of"):
        MaxViTRNN(**TINY, partition_rule="stride16")


def test_odd_input_is_zero_padded_bottom_right():
    m = _model(patch_size=2, partition_split=2, partition_rule="deepest_stride")
    x = torch.randn(1, 20, 50, 70)
    feats, _ = m(x)
    ref, _ = m(F.pad(x, (0, 96 - 70, 0, 64 - 50)))  # multiple 16 * 2 = 32
    for s in range(1, 5):
        assert feats[_stage(s)].shape == (1, 8 * 2 ** (s - 1), 64 // 2**s, 96 // 2**s)
        assert torch.allclose(feats[_stage(s)], ref[_stage(s)], atol=1e-6)


def test_variant_sizes():
    assert [m.stage_dims for m in (maxvit_rnn_tiny(), maxvit_rnn_small(), maxvit_rnn_base())] == [
        (32, 64, 128, 256),
        (48, 96, 192, 384),
        (64, 128, 256, 512),
    ]
    heads = [stage.att_blocks[0].att_window.self_attn.num_heads for stage in maxvit_rnn_small().stages]
    assert heads == [2, 4, 8, 16]
    assert [s.att_blocks[0].att_grid.self_attn.num_heads for s in maxvit_rnn_tiny().stages] == [1, 2, 4, 8]


# ------------------------------------------------------------------------------------------------
# semantics of docs/formats.md, RVT checkpoints, derived by hand


def test_state_dict_keys_are_the_official_layout():
    assert list(MaxViTRNN(**TINY).state_dict()) == _official_keys()
    assert list(MaxViTRNN(**TINY, depths=(2, 1, 1, 1)).state_dict()) == _official_keys((2, 1, 1, 1))
    # the 376-key tiny checkpoint holds 124 backbone keys
    assert len(maxvit_rnn_tiny().state_dict()) == 124


def test_stem_and_downsample_convs():
    for patch, kernel in ((4, 7), (2, 3)):
        conv = MaxViTRNN(**TINY, patch_size=patch).stages[0].downsample_cf2cl.conv
        assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == (
            (kernel, kernel),
            (patch,) * 2,
            (patch - 1,) * 2,
            None,
        )
    later = MaxViTRNN(**TINY).stages[2].downsample_cf2cl.conv
    assert (later.kernel_size, later.stride, later.padding) == ((3, 3), (2, 2), (1, 1))


def test_attention_reads_qkv_per_head_interleaved():
    torch.manual_seed(0)
    attn = PartitionSelfAttention(dim=4, dim_head=2)  # 2 heads
    tokens = torch.randn(1, 3, 4)
    y = (tokens @ attn.qkv.weight.T + attn.qkv.bias)[0]  # [3, 12]

    def by_hand(q_k_v_slices):
        heads = []
        for h in range(2):
            q, k, v = (y[:, sl] for sl in q_k_v_slices(h))
            a = torch.softmax(q @ k.T / math.sqrt(2), dim=-1)
            heads.append(a @ v)
        return torch.cat(heads, -1) @ attn.proj.weight.T + attn.proj.bias

    # RVT: head h owns columns [6h, 6h+6) = [q_h | k_h | v_h]
    interleaved = by_hand(lambda h: (slice(6 * h, 6 * h + 2), slice(6 * h + 2, 6 * h + 4), slice(6 * h + 4, 6 * h + 6)))
    # timm: [q | k | v], head h at columns 2h within each third
    timm_layout = by_hand(
        lambda h: (slice(2 * h, 2 * h + 2), slice(4 + 2 * h, 6 + 2 * h), slice(8 + 2 * h, 10 + 2 * h))
    )
    out = attn(tokens)[0]
    assert torch.allclose(out, interleaved, atol=1e-6)
    assert not torch.allclose(out, timm_layout, atol=1e-3)


@pytest.mark.parametrize("kind", ["window", "grid"])
def test_partition_groups(kind):
    """Attention mixes a token only with its window (contiguous 2x3 block) or its grid cell set
    (2x3 tokens strided by H/2, W/3)."""
    torch.manual_seed(0)
    block = PartitionAttentionBlock(dim=4, kind=kind, dim_head=4)
    with torch.no_grad():
        block.ls1.gamma.fill_(1.0)
        block.ls2.gamma.zero_()  # attention only
    x = torch.randn(1, 4, 6, 4)
    x2 = x.clone()
    r0, c0 = 1, 4
    x2[0, r0, c0, 0] += 1.0  # one channel: a uniform shift would vanish in norm1
    changed = ((block(x2, (2, 3)) - block(x, (2, 3))).abs().amax(-1) > 1e-6)[0]
    expected = torch.zeros(4, 6, dtype=torch.bool)
    for r in range(4):
        for c in range(6):
            if kind == "window":
                expected[r, c] = r // 2 == r0 // 2 and c // 3 == c0 // 3
            else:  # cell strides: 4 / 2 = 2 rows, 6 / 3 = 2 cols
                expected[r, c] = r % 2 == r0 % 2 and c % 2 == c0 % 2
    assert torch.equal(changed, expected), changed


def test_lstm_gate_order_by_hand():
    cell = ConvLstmCell(1)
    wx, wh, b = [0.3, -0.7, 1.1, 0.5], [-0.4, 0.9, 0.2, -1.3], [0.1, -0.2, 0.6, 0.05]
    with torch.no_grad():
        cell.conv1x1.weight.copy_(torch.tensor([wx, wh]).T.reshape(4, 2, 1, 1))
        cell.conv1x1.bias.copy_(torch.tensor(b))
    x, h_prev, c_prev = 0.5, -0.3, 0.8
    pre = [wx[i] * x + wh[i] * h_prev + b[i] for i in range(4)]

    def sig(v):
        return 1 / (1 + math.exp(-v))

    def run(f, i, o, g):
        c = sig(pre[f]) * c_prev + sig(pre[i]) * math.tanh(pre[g])
        return sig(pre[o]) * math.tanh(c), c

    h, c = cell(torch.full((1, 1, 1, 1), x), (torch.full((1, 1, 1, 1), h_prev), torch.full((1, 1, 1, 1), c_prev)))
    want_h, want_c = run(0, 1, 2, 3)  # forget, input, output, candidate
    assert math.isclose(h.item(), want_h, rel_tol=1e-5) and math.isclose(c.item(), want_c, rel_tol=1e-5)
    torch_lstm_h, _ = run(1, 0, 3, 2)  # nn.LSTM's order (input, forget, cell, output) would differ
    assert not math.isclose(h.item(), torch_lstm_h, rel_tol=1e-3)
    # no state = zero state
    h0, c0 = cell(torch.full((1, 1, 1, 1), x))
    pre0 = [wx[i] * x + b[i] for i in range(4)]
    want_c0 = sig(pre0[1]) * math.tanh(pre0[3])
    assert math.isclose(c0.item(), want_c0, rel_tol=1e-5)
    assert math.isclose(h0.item(), sig(pre0[2]) * math.tanh(want_c0), rel_tol=1e-5)


def test_first_window_block_takes_the_downsample_output_unnormalised():
    """Stage = downsample -> window block without norm1 -> grid block with norm1 -> LSTM, by hand."""
    m = _model(patch_size=4, partition_split=1)
    stage = m.stages[0]
    x = torch.randn(1, 20, 32, 32)
    y = F.layer_norm(
        F.conv2d(x, stage.downsample_cf2cl.conv.weight, stride=4, padding=3).permute(0, 2, 3, 1),
        (8,),
        stage.downsample_cf2cl.norm.weight,
        stage.downsample_cf2cl.norm.bias,
        1e-5,
    )
    win, grid = stage.att_blocks[0].att_window, stage.att_blocks[0].att_grid
    y = y + win.ls1.gamma * win.attention(y, (1, 1))  # no norm1
    y = y + win.ls2.gamma * win.mlp(win.norm2(y))
    y = y + grid.ls1.gamma * grid.attention(grid.norm1(y), (1, 1))
    y = y + grid.ls2.gamma * grid.mlp(grid.norm2(y))
    h, _ = stage.lstm(y.permute(0, 3, 1, 2))
    feats, _ = m(x)
    assert torch.allclose(feats["stage1"], h, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# recurrent state


def test_clip_forward_equals_step_by_step():
    m = _model(patch_size=4, partition_split=1)
    clip = torch.randn(2, 3, 20, 64, 64)
    feats, states = m.forward_clip(clip)
    step_states = None
    for t in range(3):
        step, step_states = m(clip[:, t], step_states)
        for name in NAMES:
            assert torch.allclose(feats[name][:, t], step[name], atol=1e-5)
    for (h, c), (h2, c2) in zip(states, step_states):
        assert torch.allclose(h, h2, atol=1e-5) and torch.allclose(c, c2, atol=1e-5)
    last, _ = m.forward_clip(clip, return_all=False)
    assert all(torch.allclose(last[name], feats[name][:, -1], atol=1e-6) for name in NAMES)
    # the state matters: step 1 differs from running frame 1 alone
    alone, _ = m(clip[:, 1])
    assert not torch.allclose(alone["stage4"], feats["stage4"][:, 1], atol=1e-3)


def test_is_first_resets_only_that_sample():
    m = _model(patch_size=4, partition_split=1)
    torch.manual_seed(1)
    clip_a, clip_b = torch.randn(2, 2, 20, 32, 32), torch.randn(2, 2, 20, 32, 32)
    _, prev = m.forward_clip(clip_a)

    zeroed = m.reset_states(prev, torch.tensor([True, False]))
    for (h, c), (h0, c0) in zip(prev, zeroed):
        assert not h0[0].any() and not c0[0].any()
        assert torch.equal(h0[1], h[1]) and torch.equal(c0[1], c[1])

    feats, _ = m.forward_clip(clip_b, prev, is_first=torch.tensor([True, False]))
    fresh, _ = m.forward_clip(clip_b[:1])
    carried, _ = m.forward_clip(clip_b[1:], [(h[1:], c[1:]) for h, c in prev])
    for name in NAMES:
        assert torch.allclose(feats[name][0], fresh[name][0], atol=1e-5)
        assert torch.allclose(feats[name][1], carried[name][0], atol=1e-5)
    assert not torch.allclose(fresh["stage4"][0], carried["stage4"][0], atol=1e-3)

    # [B, T] mask: sample 0's sequence starts at step 1 of this clip
    mid, _ = m.forward_clip(clip_b, prev, is_first=torch.tensor([[False, True], [False, False]]))
    alone, _ = m(clip_b[:1, 1])
    assert torch.allclose(mid["stage4"][0, 1], alone["stage4"][0], atol=1e-5)
    assert torch.allclose(mid["stage4"][1], feats["stage4"][1], atol=1e-5)


# (valid, is_first, the steps the last state must come from: a fresh state at the first of them)
MASK_CASES = [
    ([False, False, True, True], [False, False, True, False], [2, 3]),  # short clip, front-padded
    ([True, True, True, True], [True, False, False, False], [0, 1, 2, 3]),  # full clip from a sequence start
    ([True, True, True, True], [False, False, True, False], [2, 3]),  # a new sequence starts mid-clip
    ([False, True, True, True], [False, False, False, False], [1, 2, 3]),  # padding with no reset flag
]


def test_valid_and_is_first_masks_equal_per_sample_step_by_step():
    m = _model(patch_size=4, partition_split=1)
    torch.manual_seed(2)
    clip = torch.rand(len(MASK_CASES), 4, 20, 32, 32) * 5  # padded steps hold events too
    valid = torch.tensor([c[0] for c in MASK_CASES])
    is_first = torch.tensor([c[1] for c in MASK_CASES])
    last, states = m.forward_clip(clip, valid=valid, is_first=is_first, return_all=False)
    every, states_all = m.forward_clip(clip, valid=valid, is_first=is_first)
    for b, (v, _, steps) in enumerate(MASK_CASES):
        step_states = None
        for t in steps:
            step, step_states = m(clip[b : b + 1, t], step_states)
            assert all(torch.allclose(every[n][b, t], step[n][0], atol=1e-5) for n in NAMES)
        assert all(torch.allclose(last[n][b], step[n][0], atol=1e-5) for n in NAMES)
        for (h, c), (h2, c2), (h3, c3) in zip(states, states_all, step_states):
            assert torch.allclose(h[b], h3[0], atol=1e-5) and torch.allclose(c[b], c3[0], atol=1e-5)
            assert torch.equal(h[b], h2[b]) and torch.equal(c[b], c2[b])
        for t in range(4):
            if not v[t]:  # a step that is not valid for the sample gives it zero features
                assert not any(every[n][b, t].any() for n in NAMES)
    # case 2 runs steps 0 and 1 before its sequence restarts at step 2
    before, _ = m.forward_clip(clip[2:3, :2])
    assert all(torch.allclose(every[n][2, :2], before[n][0], atol=1e-5) for n in NAMES)
    # ignoring the masks gives other features: the comparison above can fail
    plain, _ = m.forward_clip(clip, return_all=False)
    assert not torch.allclose(plain["stage4"][0], last["stage4"][0], atol=1e-3)
    assert torch.allclose(plain["stage4"][1], last["stage4"][1], atol=1e-5)  # case 1 is a plain clip


def test_a_step_valid_for_no_sample_is_not_run_and_invalid_steps_keep_the_state():
    m = _model(patch_size=4, partition_split=1)
    torch.manual_seed(3)
    _, prev = m.forward_clip(torch.rand(2, 1, 20, 32, 32))
    clip = torch.rand(2, 3, 20, 32, 32)
    calls = []
    hook = m.stages[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    valid = torch.tensor([[False, True, True], [False, False, True]])
    feats, states = m.forward_clip(clip, prev, valid=valid)
    hook.remove()
    assert len(calls) == 2  # step 0 is valid for no sample
    assert not any(feats[n][:, 0].any() or feats[n][1, 1].any() for n in NAMES)
    # sample 0: prev -> step 1 -> step 2; sample 1: prev -> step 2 (step 1 left its state untouched)
    want0, states0 = m.forward_clip(clip[:1, 1:], [(h[:1], c[:1]) for h, c in prev])
    want1, states1 = m.forward_clip(clip[1:, 2:], [(h[1:], c[1:]) for h, c in prev])
    for n in NAMES:
        assert torch.allclose(feats[n][0, 1:], want0[n][0], atol=1e-5)
        assert torch.allclose(feats[n][1, 2], want1[n][0, 0], atol=1e-5)
    for (h, c), (h0, c0), (h1, c1) in zip(states, states0, states1):
        assert torch.allclose(h[0], h0[0], atol=1e-5) and torch.allclose(c[0], c0[0], atol=1e-5)
        assert torch.allclose(h[1], h1[0], atol=1e-5) and torch.allclose(c[1], c1[0], atol=1e-5)
    # the last step valid for no sample: zero maps of the right shapes, the state as before
    none_valid = torch.zeros(2, 3, dtype=torch.bool)
    last, kept = m.forward_clip(clip, prev, valid=none_valid, return_all=False)
    assert [tuple(last[n].shape) for n in NAMES] == [(2, 8 * 2**i, 8 >> i, 8 >> i) for i in range(4)]
    assert not any(last[n].any() for n in NAMES)
    assert all(torch.equal(h, h0) and torch.equal(c, c0) for (h, c), (h0, c0) in zip(kept, prev))

    with pytest.raises(ValueError, match=r"valid must be \[2, 3\]"):
        m.forward_clip(clip, valid=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"is_first must be \[2\] or \[2, 3\]"):
        m.forward_clip(clip, is_first=torch.ones(3, 3, dtype=torch.bool))


def test_gradients_reach_every_parameter_through_a_clip():
    m = _model(patch_size=2, partition_split=1, randomize=False).train()
    feats, states = m.forward_clip(torch.randn(1, 2, 20, 32, 32))
    sum(f.square().mean() for f in feats.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert all(h.grad_fn is None for h, _ in m.detach_states(states))


# ------------------------------------------------------------------------------------------------
# checkpoints


def test_official_lightning_checkpoint_loads_strictly_and_reproduces(tmp_path, caplog):
    src = _model(seed=0, patch_size=4, partition_split=1)
    path = _lightning_checkpoint(tmp_path / "rvt-t.ckpt", src)
    dst = _model(seed=1, patch_size=4, partition_split=1)
    with caplog.at_level(logging.INFO, logger="rat_plugins.models.maxvit_rnn"):
        report = load_rvt_checkpoint(dst, path)
    assert report.loaded == 124 and report.stem == "loaded"
    assert report.ignored == {"mdl.fpn.": 2, "mdl.yolox_head.": 1}
    assert report.meta == {"epoch": 7, "global_step": 12345, "pytorch-lightning_version": "1.8.6"}
    assert any("loaded 124 backbone tensors" in r.getMessage() for r in caplog.records)
    x = torch.randn(1, 2, 20, 64, 64)
    want, _ = src.forward_clip(x)
    got, _ = dst.forward_clip(x)
    assert list(got) == NAMES and all(torch.equal(want[name], got[name]) for name in NAMES)


def test_checkpoint_errors_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_rvt_checkpoint(_model(), missing)

    wide = _lightning_checkpoint(tmp_path / "rvt-wide.ckpt", MaxViTRNN(embed_dim=16, dim_head=8))
    with pytest.raises(ValueError, match=r"rvt-wide\.ckpt.*stage dims \(16, 32, 64, 128\).*Fix: build"):
        load_rvt_checkpoint(_model(), wide)

    other = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"layer1.0.conv1.weight": torch.zeros(1)}}, other)
    with pytest.raises(ValueError, match=r"resnet\.pth holds no RVT backbone weights"):
        load_rvt_checkpoint(_model(), other)

    # a norm1 in a stage's first window block is not RVT's layout: strict loading refuses it
    normed = tmp_path / "normed.ckpt"
    sd = {"mdl.backbone." + k: v for k, v in _model().state_dict().items()}
    sd["mdl.backbone.stages.0.att_blocks.0.att_window.norm1.weight"] = torch.ones(8)
    torch.save({"state_dict": sd}, normed)
    with pytest.raises(ValueError, match=r"normed\.ckpt does not load strictly.*att_window\.norm1\.weight"):
        load_rvt_checkpoint(_model(), normed)

    unsafe = _lightning_checkpoint(
        tmp_path / "rvt-old.ckpt", _model(), extra_objects={"hyper_parameters": fractions.Fraction(1, 3)}
    )
    with pytest.raises(ValueError, match=r"rvt-old\.ckpt.*fractions\.Fraction.*re-save only the weights"):
        load_rvt_checkpoint(_model(), unsafe)


def test_patch4_checkpoint_into_patch2_model_reinitialises_only_the_stem(tmp_path, caplog):
    src = _model(seed=0, patch_size=4, partition_split=1)
    path = _lightning_checkpoint(tmp_path / "rvt-t.ckpt", src)
    dst = _model(seed=1, patch_size=2, partition_split=1)
    with caplog.at_level(logging.INFO, logger="rat_plugins.models.maxvit_rnn"):
        report = load_rvt_checkpoint(dst, path)
    stem_lines = [r.getMessage() for r in caplog.records if "stem conv" in r.getMessage()]
    assert len(stem_lines) == 2  # the warning, and the report line
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    msg = warning[0].getMessage()
    assert "rvt-t.ckpt" in msg and "7x7 (patch 4)" in msg and "3x3 (patch 2)" in msg and "re-initialised" in msg
    assert report.loaded == 123 and report.stem.startswith("re-initialised")

    stem = "stages.0.downsample_cf2cl.conv.weight"
    got, want = dst.state_dict(), src.state_dict()
    assert got[stem].shape == (8, 20, 3, 3)
    fan_in_bound = 1 / math.sqrt(20 * 9)  # PyTorch's default conv init: |w| <= 1 / sqrt(fan_in)
    assert 0 < got[stem].abs().max() <= fan_in_bound + 1e-7
    assert all(torch.equal(got[k], want[k]) for k in want if k != stem)
    feats, _ = dst(torch.randn(1, 20, 32, 32))
    assert feats["stage1"].shape == (1, 8, 16, 16)

    with pytest.raises(ValueError, match="patch_size=4"):
        load_rvt_checkpoint(_model(patch_size=2), path, stem_mismatch="error")


# ------------------------------------------------------------------------------------------------
# adapters


def test_mmdet_registry_builds_the_backbone(tmp_path):
    from mmdet.registry import MODELS

    import rat_plugins.mm  # noqa: F401  (registers MaxViTRNN)

    cfg = dict(
        type="MaxViTRNN",
        variant="tiny",
        embed_dim=8,
        dim_head=8,
        patch_size=2,
        partition_split=1,
        out_indices=(0, 1, 2, 3),
    )
    net = MODELS.build(cfg)
    outs = net(torch.randn(2, 20, 64, 96))  # multiples of 32 (RVT's rule, 32 x partition_split): no padding
    assert isinstance(outs, tuple) and net.strides == (2, 4, 8, 16) and net.out_channels == (8, 16, 32, 64)
    assert [o.shape for o in outs] == [(2, 8 * 2**i, 64 // 2 ** (i + 1), 96 // 2 ** (i + 1)) for i in range(4)]
    three = MODELS.build({**cfg, "patch_size": 4, "out_indices": (1, 2, 3)})
    assert [o.shape[1:] for o in three(torch.randn(1, 20, 64, 64))] == [(16, 8, 8), (32, 4, 4), (64, 2, 2)]
    with pytest.raises(ValueError, match="out_indices"):
        MODELS.build({**cfg, "out_indices": (1, 4)})

    src = _model(seed=3, patch_size=2, partition_split=1)
    path = _lightning_checkpoint(tmp_path / "rvt.ckpt", src)
    loaded = MODELS.build({**cfg, "checkpoint": str(path)})
    loaded.init_weights()
    assert loaded.checkpoint_report.loaded == 124
    x = torch.randn(1, 20, 32, 32)
    want, _ = src(x)
    outs = loaded(x)
    assert len(outs) == len(want) == 4 and all(torch.equal(o, w) for o, w in zip(outs, want.values()))


@pytest.mark.parametrize("patch, names", [(2, ["p1", "p2", "p3", "p4"]), (4, ["p2", "p3", "p4", "p5"])])
def test_detectron2_backbone_output_shape(patch, names):
    from rat_plugins.detectron2.maxvit_rnn import MaxViTRNN

    bb = MaxViTRNN(embed_dim=8, dim_head=8, patch_size=patch, partition_split=1)
    shapes = bb.output_shape()
    assert list(shapes) == names
    assert [(s.channels, s.stride) for s in shapes.values()] == [(8 * 2**i, patch * 2**i) for i in range(4)]
    # RVT's rule, 32 x partition_split at either patch size
    assert bb.size_divisibility == 32 and bb.padding_constraints["size_divisibility"] == 32
    out = bb(torch.randn(1, 20, 64, 96))
    assert all(out[n].shape == (1, shapes[n].channels, 64 // shapes[n].stride, 96 // shapes[n].stride) for n in names)
    only = MaxViTRNN(embed_dim=8, dim_head=8, patch_size=patch, out_features=names[1:])
    assert list(only(torch.randn(1, 20, 64, 64))) == names[1:]


def test_detectron2_registry_build():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    from rat_plugins.detectron2.maxvit_rnn import add_maxvit_rnn_config

    cfg = get_cfg()
    add_maxvit_rnn_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_maxvit_rnn_backbone"
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [0.0] * 20, [1.0] * 20
    cfg.MODEL.MAXVIT_RNN.PATCH_SIZE = 2
    bb = build_backbone(cfg)
    assert {n: (s.channels, s.stride) for n, s in bb.output_shape().items()} == {
        "p1": (32, 2),
        "p2": (64, 4),
        "p3": (128, 8),
        "p4": (256, 16),
    }
    assert bb.net.in_chans == 20 and bb.size_divisibility == 64  # 32 x partition_split 2
