"""tools/experiment_record.py (rat_plugins.experiments.records) writes the four-file experiment record
from the RVT configs (diff, commands, hypothesis, components), idempotently and refusing to overwrite
a differing record; and a smoke run of benchmarks/bench_rvt.py."""

import sys
import types

import pytest

from rat_plugins.experiments import records

from _helpers import REPO, run_cmd

CONFIGS = REPO / "projects/RVT/configs"
BASELINE = CONFIGS / "maxvit_yolox_patch4_3scale_baseline.py"
PATCH2 = CONFIGS / "patch2_4scale_sizeaware_200k.py"
TOOL = REPO / "tools/experiment_record.py"
FILES = ("hypothesis.md", "modifications.md", "command.md", "code_changes.md")


def record(config, out, *extra, check=True):
    return run_cmd(
        [sys.executable, str(TOOL), str(config), "--baseline", str(BASELINE), "--out", str(out), *extra], check=check
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("record")
    proc = record(PATCH2, out)
    return out, proc, {name: (out / name).read_text() for name in FILES}


def test_writes_the_four_files_from_the_configs(written):
    out, proc, files = written
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # no temporary files left behind
    assert all(f"written     {out / name}" in proc.stdout for name in FILES)

    mods = files["modifications.md"]
    for line in [
        "- `model.backbone.patch_size`: `4` -> `2`",
        "- `model.backbone.out_indices`: `(1, 2, 3)` -> `(0, 1, 2, 3)`",
        "- `model.neck.in_channels`: `[128, 256, 512]` -> `[64, 128, 256, 512]`",
        "- `model.bbox_head.type`: `'YOLOXHead'` -> `'SizeAwareYOLOXHead'`",
        "- `model.bbox_head.strides`: `(8, 16, 32)` -> `(2, 4, 8, 16)`",
        "- `train_cfg.max_iters`: `100000` -> `200000`",
        "- `param_scheduler.0.end`: `100000` -> `200000`",
        "- `model.bbox_head.size_aware_weight` = `2.0`",
        "- `model.bbox_head.weight_type` = `'exponential'`",
        "- `model.backbone.partition_rule` = `'rvt'`",  # RVT's geometry, said explicitly
    ]:
        assert line in mods, line
    assert "8 changed, 5 added, 0 removed." in mods
    assert "experiment" not in mods.split("## Changed")[1].split("## Config sources")[0]  # documentation, not a setting
    assert "optim_wrapper" not in mods and "data_root" not in mods  # unchanged keys are not listed

    cmd = files["command.md"]
    rel = "projects/RVT/configs/patch2_4scale_sizeaware_200k.py"
    assert f"python tools/train.py {rel} --work-dir work_dirs/patch2_4scale_sizeaware_200k\n" in cmd
    assert f"tools/dist_train.sh {rel} 1 --work-dir work_dirs/patch2_4scale_sizeaware_200k\n" in cmd
    assert f'/.mim/tools/train.py" {rel} --work-dir' in cmd and "import mmdet" in cmd
    assert (
        "--cfg-options train_dataloader.batch_size=1 optim_wrapper.accumulative_counts=2 "
        "train_cfg.max_iters=400000 param_scheduler.0.end=400000"
    ) in cmd

    from mmengine.config import Config

    exp = Config.fromfile(str(PATCH2)).experiment
    hyp = files["hypothesis.md"]
    assert exp.hypothesis in hyp and exp.name in hyp
    assert all(f"- {c}" in hyp for c in exp.success_criteria + exp.failure_criteria)
    assert hyp.index("## Success criteria") < hyp.index(f"- {exp.success_criteria[0]}") < hyp.index("## Failure")

    code = files["code_changes.md"]
    new = code.split("## Components the baseline does not use")[1].split("##")[0]
    assert (
        "`model.bbox_head`: `SizeAwareYOLOXHead` -> `rat_plugins.mm.yolox_rvt.SizeAwareYOLOXHead` "
        "(MODELS, `rat_plugins/mm/yolox_rvt.py`); baseline: `YOLOXHead`"
    ) in new
    assert "`size_aware_weight`" in new and "MaxViTRNN" not in new
    assert (
        "`model.backbone`: `MaxViTRNN` -> `rat_plugins.mm.maxvit_rnn.MaxViTRNN`; changed: `out_indices`, "
        "`partition_rule`, `patch_size`" in code
    )
    assert "- `YOLOXHead`" in code.split("## Baseline components no longer used")[1]


def test_rerun_is_idempotent_and_a_differing_record_is_refused(written, tmp_path):
    out, _, files = written
    mtimes = {name: (out / name).stat().st_mtime_ns for name in FILES}
    again = record(PATCH2, out)
    assert all(f"unchanged   {out / name}" in again.stdout for name in FILES)
    assert {name: (out / name).read_text() for name in FILES} == files
    assert {name: (out / name).stat().st_mtime_ns for name in FILES} == mtimes  # not even rewritten

    stale = tmp_path / "stale"
    stale.mkdir()
    for name, text in files.items():
        (stale / name).write_text(text)
    (stale / "command.md").write_text("python tools/train.py something_else.py\n")
    (stale / "hypothesis.md").unlink()
    refused = record(PATCH2, stale, check=False)
    assert refused.returncode == 2
    assert "already holds a different record (command.md differ" in refused.stderr and "--force" in refused.stderr
    assert not (stale / "hypothesis.md").exists()  # nothing written when refusing
    forced = record(PATCH2, stale, "--force")
    assert f"overwritten {stale / 'command.md'}" in forced.stdout
    assert f"written     {stale / 'hypothesis.md'}" in forced.stdout
    assert {name: (stale / name).read_text() for name in FILES} == files


def test_clear_errors(tmp_path, capsys):
    def record(config, out, check=False):  # in-process: the error paths need no subprocess
        code = records.main([str(config), "--baseline", str(BASELINE), "--out", str(out)])
        return types.SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)

    missing = record(tmp_path / "nope.py", tmp_path / "a", check=False)
    assert missing.returncode == 2 and "config file not found" in missing.stderr and "nope.py" in missing.stderr

    bare = tmp_path / "bare.py"
    bare.write_text(f"_base_ = ['{BASELINE}']\nexperiment = dict(_delete_=True)\nmax_iters = 5\n")
    no_exp = tmp_path / "no_exp.py"
    no_exp.write_text("model = dict(type='RecurrentYOLOX')\n")
    err = record(no_exp, tmp_path / "b", check=False)
    assert err.returncode == 2 and "has no top-level `experiment` field" in err.stderr
    err = record(bare, tmp_path / "c", check=False)
    assert err.returncode == 2 and "experiment.hypothesis must be a non-empty string" in err.stderr

    inherits = tmp_path / "inherits.py"  # the baseline's experiment, inherited unchanged
    inherits.write_text(f"_base_ = ['{BASELINE}']\nmax_iters = 5\n")
    err = record(inherits, tmp_path / "d", check=False)
    assert err.returncode == 2 and "is the baseline's" in err.stderr and "_delete_=True" in err.stderr

    typo = tmp_path / "typo.py"
    typo.write_text(
        f"_base_ = ['{BASELINE}']\nexperiment = dict(_delete_=True, hypothesis='h', "
        "success_criteria=['s'], failure_criteria=['f'], "
        "variants=dict(v=['train_dataloader.batchsize=1']))\n"
    )
    err = record(typo, tmp_path / "e", check=False)
    assert err.returncode == 2 and "experiment.variants.v" in err.stderr and "batch_size" in err.stderr
    assert not any((tmp_path / d).exists() for d in "abcde")


@pytest.mark.slow  # two fresh processes importing mmdet: about 15 s on one CPU thread
def test_bench_rvt_smoke():
    proc = run_cmd(
        [
            sys.executable,
            str(REPO / "benchmarks/bench_rvt.py"),
            "--size",
            "64x64",
            "--embed",
            "8",
            "--clip-len",
            "2",
            "--batch",
            "1",
            "--steps",
            "1",
            "--threads",
            "1",
            "--device",
            "cpu",
        ]
    )
    lines = proc.stdout.splitlines()
    base = next(ln for ln in lines if ln.startswith("baseline "))
    exp = next(ln for ln in lines if ln.startswith("experiment "))
    assert "| 4 " in base and "8/16/32" in base and "YOLOXHead" in base
    assert "| 2 " in exp and "2/4/8/16" in exp and "SizeAwareYOLOXHead" in exp
    ratio = next(ln for ln in lines if ln.startswith("activation memory (saved for backward) ratio: "))
    assert float(ratio.split(": ")[1].split("x")[0]) > 1.5  # stride-2 maps hold more than stride-8 ones
