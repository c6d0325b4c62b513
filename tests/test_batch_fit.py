"""Automatic batch sizing: the largest micro-batch that fits, the rest accumulated (rat_plugins.engine.batch_fit)."""

import json

import pytest
import torch

from rat_plugins.engine.batch_fit import fit_micro_batch, load_plan, measure_cpu_step, save_plan
from rat_plugins.utils.config_keys import ConfigError

from _helpers import run_cmd, tiny_ofat_command


def _oom_above(limit, tried):
    def try_step(m):
        tried.append(m)
        if m > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory at {m}")
        return 100.0 * m

    return try_step


def test_injected_out_of_memory_picks_the_largest_micro_batch_that_runs():
    tried = []
    plan = fit_micro_batch(_oom_above(3, tried), per_process_batch=8, budget_mb=1e9, device="cuda:0")
    assert (plan.micro_batch, plan.accumulation) == (2, 4)
    assert tried[0] == 8 and plan.peak_mb[8] is None and plan.peak_mb[2] == 200.0
    assert "micro-batch 2 x 4 accumulation steps = 8 images" in plan.describe()
    everything = fit_micro_batch(_oom_above(100, []), per_process_batch=6, budget_mb=1e9)
    assert (everything.micro_batch, everything.accumulation) == (6, 1)
    # 12 = 1, 2, 3, 4, 6, 12: the micro-batch divides the batch, so the accumulation is whole
    assert fit_micro_batch(_oom_above(5, []), per_process_batch=12, budget_mb=1e9).micro_batch == 4


def test_a_budget_limits_the_micro_batch_and_nothing_fitting_is_refused():
    plan = fit_micro_batch(lambda m: 100.0 * m, per_process_batch=8, budget_mb=450)
    assert (plan.micro_batch, plan.accumulation) == (4, 2)
    with pytest.raises(ConfigError, match="not even a micro-batch of 1 fits in 50 MB"):
        fit_micro_batch(lambda m: 100.0 * m, per_process_batch=8, budget_mb=50)


def test_cpu_measure_grows_with_the_micro_batch_and_the_plan_round_trips(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3))
    x = torch.randn(8, 3, 32, 32)
    peaks = {m: measure_cpu_step(model, lambda m=m: model(x[:m]).pow(2).mean()) for m in (1, 2, 4)}
    assert peaks[1] < peaks[2] < peaks[4]
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind
    plan = fit_micro_batch(lambda m: peaks.get(m, 1e9), per_process_batch=8, budget_mb=peaks[2] * 1.01)
    plan.key = "abc"
    save_plan(tmp_path, plan)
    assert load_plan(tmp_path, "abc") == plan and load_plan(tmp_path, "other") is None


@pytest.mark.slow
def test_detectron2_auto_batch_plans_against_a_cpu_budget_and_reuses_the_plan(heads_data, tmp_path):
    env = {"RAT_DATASETS": str(heads_data)}
    out = tmp_path / "run"
    run_cmd(tiny_ofat_command(out, "--auto-batch", "--memory-budget-gb", "64", batch=4), env=env)
    plan = json.loads((out / "batch_plan.json").read_text())
    assert (plan["micro_batch"], plan["accumulation"], plan["per_process_batch"]) == (4, 1, 4)
    assert "Auto batch: micro-batch 4 x 1 accumulation steps" in (out / "log.txt").read_text()
    measured = plan["peak_mb"]["4"]
    # a budget just below the measured peak of 4 images: fewer per forward pass, the rest accumulated
    half = tmp_path / "half"
    budget_gb = (measured * 0.99) / 1024
    run_cmd(tiny_ofat_command(half, "--auto-batch", "--memory-budget-gb", f"{budget_gb:.6f}", batch=4), env=env)
    plan = json.loads((half / "batch_plan.json").read_text())
    assert plan["micro_batch"] in (1, 2) and plan["micro_batch"] * plan["accumulation"] == 4, plan
    assert "Gradient accumulation" in (half / "log.txt").read_text()
    # the resumed run reads the plan instead of probing again
    run_cmd(
        tiny_ofat_command(half, "--auto-batch", "--memory-budget-gb", f"{budget_gb:.6f}", "--resume", batch=4), env=env
    )
    assert f"(the plan in {half})" in (half / "log.txt").read_text()
    # two processes: each probes its own half of the batch, and the accumulation counts the world
    two = tmp_path / "two"
    run_cmd(tiny_ofat_command(two, "--num-gpus", "2", "--auto-batch", "--memory-budget-gb", "64", batch=4), env=env)
    plan = json.loads((two / "batch_plan.json").read_text())
    assert (plan["micro_batch"], plan["accumulation"], plan["per_process_batch"]) == (2, 1, 4 // 2), plan
    assert "micro-batch 2 x 1 accumulation steps = 2 images per process" in (two / "log.txt").read_text()
    refused = run_cmd(
        tiny_ofat_command(tmp_path / "tiny", "--auto-batch", "--memory-budget-gb", "0.0001", batch=4),
        env=env,
        check=False,
    )
    assert refused.returncode == 2 and "error: not even a micro-batch of 1 fits in 0 MB on cpu" in refused.stderr


def test_optimizer_state_copies_by_optimizer_and_by_config_name():
    from rat_plugins.engine.batch_fit import optimizer_state_copies

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert optimizer_state_copies(torch.optim.AdamW(params)) == 2
    assert optimizer_state_copies(torch.optim.SGD(params, lr=0.1)) == 0
    assert optimizer_state_copies(torch.optim.SGD(params, lr=0.1, momentum=0.9)) == 1
    assert optimizer_state_copies(torch.optim.RMSprop(params, momentum=0.9)) == 2
    assert optimizer_state_copies(type_name="AdamW") == 2 and optimizer_state_copies(type_name="SGD") == 1
