"""Activation checkpointing of the backbones' blocks: the same outputs and gradients, blocks run twice."""

import pytest
import torch

from rat_plugins.models.maxvit_rnn import MaxViTRNN
from rat_plugins.models.rat_backbone import RATBackbone
from rat_plugins.models.vim import VimBackbone


def _vim():
    return VimBackbone(embed_dim=32, depth=2, pt_hw_seq_len=4), torch.randn(2, 3, 32, 32), lambda m: m.layers[0]


def _rat():
    model = RATBackbone(num_blocks=2, feature_dims=16, num_heads=2, iters=1, mlp_ratio=2, scales=(1.0, 0.5))
    return model, torch.randn(2, 3, 16, 16), lambda m: m.sga_layers[0]


def _maxvit():
    return MaxViTRNN(embed_dim=8, dim_head=8), torch.randn(1, 20, 64, 64), lambda m: m.stages[1].att_blocks[0]


def _loss(model, x):
    out = model.forward_features(x) if not isinstance(model, MaxViTRNN) else model(x)[0]
    return sum(f.float().pow(2).mean() for f in out.values())


@pytest.mark.parametrize("build", [_vim, _rat, _maxvit], ids=["vim", "rat", "maxvit_rnn"])
def test_checkpointed_blocks_give_the_same_outputs_and_gradients_and_recompute(build):
    torch.manual_seed(0)
    model, x, block_of = build()
    calls, block = [], block_of(model)
    original = block.forward

    def counted(*args, **kwargs):  # forward hooks do not fire in checkpoint's recomputation
        calls.append(1)
        return original(*args, **kwargs)

    block.forward = counted
    results = {}
    for enabled in (False, True):
        model.set_grad_checkpointing(enabled)
        model.zero_grad()
        loss = _loss(model.train(), x)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[enabled] = (loss.detach(), grads, len(calls))
        calls.clear()
    (plain_loss, plain_grads, plain_calls), (ckpt_loss, ckpt_grads, ckpt_calls) = results[False], results[True]
    assert plain_calls >= 1 and ckpt_calls == 2 * plain_calls  # the block ran again in the backward pass
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    assert ckpt_grads.keys() == plain_grads.keys() and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation: nothing to recompute
        _loss(model.eval(), x)
    assert len(calls) == plain_calls


def test_constructor_switch():
    assert VimBackbone(embed_dim=32, depth=2, pt_hw_seq_len=4, grad_checkpointing=True).grad_checkpointing
    model = MaxViTRNN(embed_dim=8, dim_head=8, grad_checkpointing=True)
    assert all(stage.grad_checkpointing for stage in model.stages)
