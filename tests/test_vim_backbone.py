"""ViM detection backbone: any aspect ratio, freezing, official checkpoint loading."""
import argparse
import logging

import pytest
import torch

from rat_plugins.models.vim import VimBackbone, load_vim_checkpoint


def _official_state(embed=32, depth=2, grid=4, middle_cls=True):
    """A classification state dict in the official key layout (cls slot at M//2, head, rope)."""
    src = VimBackbone(embed_dim=embed, depth=depth, pt_hw_seq_len=grid)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    m = grid * grid
    cls_entry = torch.full((1, 1, embed), 7.0)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, : m // 2], cls_entry, state["pos_embed"][:, m // 2:]], 1)
    state.update({"cls_token": torch.zeros(1, 1, embed), "head.weight": torch.zeros(10, embed),
                  "head.bias": torch.zeros(10), "rope.freqs_cos": torch.zeros(m, embed), "rope.freqs_sin": torch.zeros(m, embed)})
    return src, state


@pytest.mark.parametrize("hw", [(64, 96), (80, 48), (50, 70), (16, 16)])
def test_any_aspect_ratio(hw):
    net = VimBackbone(embed_dim=16, depth=2, pt_hw_seq_len=4)
    out = net(torch.randn(2, 3, *hw))
    assert out.shape == (2, 16, -(-hw[0] // 16), -(-hw[1] // 16))
    assert torch.isfinite(out).all()


def test_freeze_builds_no_graph_and_stays_in_eval():
    net = VimBackbone(embed_dim=16, depth=2, freeze=True)
    net.train()
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    assert net(torch.randn(1, 3, 32, 32)).grad_fn is None


def test_trainable_backbone_gets_gradients():
    net = VimBackbone(embed_dim=16, depth=2, pt_hw_seq_len=4)
    net(torch.randn(1, 3, 48, 32)).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad and p is not net.norm_f.weight)


@pytest.mark.parametrize("process", ["none", "add", "add & norm"])
def test_last_layer_process(process):
    torch.manual_seed(0)
    a = VimBackbone(embed_dim=16, depth=2, last_layer_process=process)
    b = VimBackbone(embed_dim=16, depth=2, last_layer_process="add")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 32)
    same = torch.allclose(a(x), b(x))
    assert same == (process == "add")


def test_official_deit_style_checkpoint_loads_with_report(tmp_path, caplog):
    src, state = _official_state()
    path = tmp_path / "vim_tiny_pretrained.pth"
    torch.save({"model": state, "optimizer": {"state": {}}, "lr_scheduler": {"last_epoch": 3}, "epoch": 299,
                "model_ema": None, "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="vim_tiny", lr=5e-4)}, path)
    with caplog.at_level(logging.INFO):
        net = VimBackbone(embed_dim=32, depth=2, pt_hw_seq_len=4, checkpoint=path)
    assert "dropped" in caplog.text and "cls_token" in caplog.text
    report = net.load_official_checkpoint(path)
    assert set(report["dropped"]) == {"cls_token", "head.weight", "head.bias", "rope.freqs_cos", "rope.freqs_sin",
                                      "pos_embed[cls slot]"}
    assert report["missing"] == [] and report["unexpected"] == []
    torch.testing.assert_close(net.pos_embed, src.pos_embed)  # cls slot removed from the middle
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(net(x), src(x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint=''"):
        load_vim_checkpoint(tmp_path / "absent.pth")
    _, state = _official_state(embed=32)
    path = tmp_path / "small.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="embed dim 32 and depth 2.*embed dim 16 and depth 2"):
        VimBackbone(embed_dim=16, depth=2, pt_hw_seq_len=4, checkpoint=path)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable ViM checkpoint"):
        load_vim_checkpoint(bad)


def test_pos_embed_resized_to_other_pretraining_grid(tmp_path):
    _, state = _official_state(grid=4)
    path = tmp_path / "grid4.pth"
    torch.save(state, path)  # a bare state dict
    net = VimBackbone(embed_dim=32, depth=2, pt_hw_seq_len=6, checkpoint=path)
    assert net.pos_embed.shape == (1, 36, 32)
