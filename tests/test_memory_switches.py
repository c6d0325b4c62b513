"""The memory switches of both tool families: mixed precision, activation checkpointing, gradient clipping."""

import json
import re
import sys

import pytest
import torch

from _helpers import run_cmd, tiny_ofat_command


def test_clip_grad_norm_hook_clips_and_logs_the_norm_before():
    from detectron2.utils.events import EventStorage

    from rat_plugins.detectron2.hooks import ClipGradNorm

    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (model(torch.randn(4, 8)) * 100).sum().backward()
    before = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    hook = ClipGradNorm(1.0)
    hook.trainer = type("Trainer", (), {"optimizer": optimizer})()
    with EventStorage() as storage:
        hook.after_backward()
        logged = storage.latest()["grad_norm"][0]
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert before > 1.0 and logged == pytest.approx(float(before)) and float(after) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.slow
def test_detectron2_trains_with_bf16_checkpointing_and_clipping_on_cpu(heads_data, tmp_path):
    out = tmp_path / "run"
    flags = ["--amp-dtype", "bfloat16", "--activation-checkpointing", "--clip-grad", "0.5"]
    proc = run_cmd(tiny_ofat_command(out, *flags), env={"RAT_DATASETS": str(heads_data)})
    log = (out / "log.txt").read_text()
    assert "Activation checkpointing: backbone.net" in log, proc.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records if "grad_norm" in r] == [0, 1, 2, 3]
    config = (out / "config.yaml").read_text()
    assert "clip_grad_norm: 0.5" in config and "dtype: bfloat16" in config
    assert json.loads((out / "final_metrics.json").read_text())["max_iter"] == 4


def test_detectron2_float16_on_cpu_is_refused_with_the_fix(heads_data, tmp_path):
    proc = run_cmd(tiny_ofat_command(tmp_path / "run", "--amp"), env={"RAT_DATASETS": str(heads_data)}, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: train.amp with float16 needs a CUDA device (loss scaling); on CPU use bfloat16" in proc.stderr


@pytest.mark.slow
def test_mmseg_trains_with_checkpointing_and_clipping(fundus_data, tmp_path):
    from test_setr import SMALL, cfg_options

    work = tmp_path / "setr"
    args = [sys.executable, "tools/train.py", str(SMALL), "--work-dir", str(work), "--activation-checkpointing"]
    args += ["--clip-grad", "1.0", *cfg_options()]
    proc = run_cmd(args, env={"RAT_DATASETS": str(fundus_data), "RAT_PLUGINS_SCAN_BACKEND": "torch"})
    text = proc.stdout + proc.stderr
    assert re.search(r"Activation checkpointing: .*backbone\.layers\.3", text), text[-3000:]
    dumped = (work / SMALL.name).read_text()
    assert "clip_grad=dict(max_norm=1.0, norm_type=2)" in dumped
    assert json.loads((work / "final_metrics.json").read_text())["iter"] == 4


def test_mmseg_amp_on_cpu_is_refused_with_the_fix(fundus_data, tmp_path):
    from test_setr import SMALL

    args = [sys.executable, "tools/train.py", str(SMALL), "--work-dir", str(tmp_path / "w"), "--amp"]
    proc = run_cmd(args, env={"RAT_DATASETS": str(fundus_data)}, check=False)
    assert proc.returncode == 2 and "error: --amp: mmengine's AmpOptimWrapper needs a CUDA device" in proc.stderr
