"""``tools/train.py --auto-batch``: micro-batches accumulated inside one iteration, equal to the whole batch."""

import json
import sys

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper

from rat_plugins.mm.batch_fit import micro_batched_train_step, split_batch

from _helpers import run_cmd


class _Regression(BaseModel):
    """The smallest mmengine model: a linear map, its loss a per-sample mean."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, inputs, data_samples=None, mode="loss"):
        x, target = torch.stack(inputs), torch.stack(data_samples)
        return {"loss": (self.linear(x) - target).pow(2).mean()}


def _step(accumulation, data):
    torch.manual_seed(0)
    model = _Regression()
    optim = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    if accumulation > 1:
        model.train_step = micro_batched_train_step(accumulation).__get__(model)
    log = model.train_step(data, optim)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, log


def test_micro_batched_step_equals_the_whole_batch():
    torch.manual_seed(1)
    data = dict(inputs=list(torch.randn(8, 4)), data_samples=list(torch.randn(8, 3)))
    assert [len(c["inputs"]) for c in split_batch(data, 4)] == [2, 2, 2, 2]
    whole, whole_log = _step(1, data)
    for accumulation in (2, 4):
        weights, log = _step(accumulation, data)
        for key in whole:
            torch.testing.assert_close(weights[key], whole[key], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(log["loss"], whole_log["loss"], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_setr_auto_batch_against_a_cpu_budget(fundus_data, tmp_path):
    from test_setr import SMALL, cfg_options

    env = {"RAT_DATASETS": str(fundus_data), "RAT_PLUGINS_SCAN_BACKEND": "torch"}

    def train(work, *flags):
        return run_cmd(
            [sys.executable, "tools/train.py", str(SMALL), "--work-dir", str(work), *flags, *cfg_options()], env=env
        )

    whole = tmp_path / "whole"
    train(whole, "--auto-batch", "--memory-budget-gb", "64")
    plan = json.loads((whole / "batch_plan.json").read_text())
    assert (plan["micro_batch"], plan["accumulation"]) == (2, 1)  # SMALL trains batch 2
    split = tmp_path / "split"
    budget = f"{plan['peak_mb']['2'] * 0.99 / 1024:.6f}"
    proc = train(split, "--auto-batch", "--memory-budget-gb", budget)
    plan = json.loads((split / "batch_plan.json").read_text())
    assert (plan["micro_batch"], plan["accumulation"]) == (1, 2)
    assert "Auto batch: micro-batch 1 x 2 accumulation steps" in proc.stdout + proc.stderr
    assert json.loads((split / "final_metrics.json").read_text())["iter"] == 4  # the config's iterations
    resumed = train(split, "--auto-batch", "--memory-budget-gb", budget, "--resume")
    assert f"(the plan in {split})" in resumed.stdout + resumed.stderr
