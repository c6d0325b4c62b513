"""k micro-batches with accumulation give the same update as one full batch."""

import copy

import torch
from torch import nn

from rat_plugins.detectron2.engine import AccumulatingTrainer


class TinyRegressor(nn.Module):
    """Per-batch mean loss, LayerNorm instead of batch statistics."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        y = torch.stack([d["y"] for d in batch])
        return {
            "loss_mse": ((self.net(x).squeeze(1) - y) ** 2).mean(),
            "loss_l1": (self.net(x).squeeze(1) - y).abs().mean(),
        }


def _loader(samples, batch):
    while True:
        for i in range(0, len(samples), batch):
            yield samples[i : i + batch]


def _train(model, samples, batch, accumulation, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    trainer = AccumulatingTrainer(model, _loader(samples, batch), opt, accumulation=accumulation)
    from detectron2.utils.events import EventStorage

    with EventStorage(0) as trainer.storage:
        for trainer.iter in range(steps):
            trainer.run_step()
    return model, trainer.storage


def test_micro_batches_equal_full_batch():
    torch.manual_seed(0)
    samples = [dict(x=torch.randn(6), y=torch.randn(())) for _ in range(24)]
    base = TinyRegressor()
    full, _ = _train(copy.deepcopy(base), samples, batch=8, accumulation=1)
    micro, storage = _train(copy.deepcopy(base), samples, batch=2, accumulation=4)
    changed = False
    for (name, a), b, c in zip(full.named_parameters(), micro.parameters(), base.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        changed |= not torch.equal(a, c)
    assert changed  # the steps really updated the weights
    # the logged loss is the mean over the micro-batches, i.e. the full-batch loss
    assert "loss_mse" in storage.histories()


def test_accumulation_must_be_positive():
    import pytest

    from rat_plugins.detectron2 import engine
    from rat_plugins.utils.config_keys import ConfigError

    assert engine.ConfigError is ConfigError  # the earlier import name
    with pytest.raises(ConfigError):
        AccumulatingTrainer(TinyRegressor(), [], torch.optim.SGD(TinyRegressor().parameters(), lr=1), accumulation=0)
