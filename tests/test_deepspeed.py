"""DeepSpeed ZeRO through mmengine's FlexibleRunner (tools/train.py --deepspeed), on CPU with gloo.

DeepSpeed is installed into a folder of its own that only these tests put on PYTHONPATH (the
``deepspeed_env`` fixture): in the venv, every mmengine Runner of every other test would import it.
Each training test compares with the plain Runner's run of the same config: the weights after
training (converted from ZeRO's shards by tools/convert_deepspeed_checkpoint.py) are the same.
"""

import json
import re
import signal
import sys

import pytest
import torch

from _helpers import REPO, run_cmd

TRAIN = str(REPO / "tools" / "train.py")
CONVERT = str(REPO / "tools" / "convert_deepspeed_checkpoint.py")
SETR = REPO / "projects" / "SETR" / "configs" / "setr_vit-s16_mla_fundus.py"


# ----------------------------------------------------------------------------- the generated config
def test_deepspeed_config_from_the_runs_words():
    from rat_plugins.engine.deepspeed_config import deepspeed_config, zero_stage

    config = deepspeed_config(zero_stage("zero2"), micro_batch=4, accumulation=2, clip_grad=1.0, precision="bf16")
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in config["zero_optimization"]
    assert config["gradient_clipping"] == 1.0 and config["bf16"] == {"enabled": True} and "fp16" not in config
    offloaded = deepspeed_config(3, micro_batch=1, offload_optimizer="cpu", offload_param="cpu")
    assert offloaded["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert offloaded["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "gradient_clipping" not in offloaded and "bf16" not in offloaded


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stage=2, offload_param="cpu"), "ZeRO stage 3 only"),
        (dict(stage=2, precision="fp16"), "fp16 needs a CUDA device"),
        (dict(stage=3, offload_optimizer="nvme"), "only cpu is supported"),
        (dict(stage=2, micro_batch=0), "must be >= 1"),
    ],
)
def test_deepspeed_config_refuses_what_cannot_run(kwargs, message):
    from rat_plugins.engine.deepspeed_config import deepspeed_config
    from rat_plugins.utils.config_keys import ConfigError

    kwargs.setdefault("micro_batch", 2)
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(**kwargs)


def test_zero_stage_names():
    from rat_plugins.engine.deepspeed_config import zero_stage
    from rat_plugins.utils.config_keys import ConfigError

    assert zero_stage("zero3") == 3 and zero_stage(2) == 2
    with pytest.raises(ConfigError, match="choose zero2 or zero3"):
        zero_stage("zero1")


def test_a_deepspeed_checkpoint_folder_is_checked_file_by_file(tmp_path):
    from rat_plugins.engine.checkpoints import checkpoint_candidates, checkpoint_problem

    folder = tmp_path / "iter_4.pth"
    folder.mkdir()
    assert "no DeepSpeed model states" in checkpoint_problem(folder)
    torch.save({"module": {}}, folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert checkpoint_problem(folder) is None
    shard = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:40])  # cut short, as by a kill
    assert checkpoint_problem(folder).startswith("zero_pp_rank_0_mp_rank_00_optim_states.pt: it is truncated")
    (tmp_path / ".iter_6.pth.partial").mkdir()  # an unfinished save is never a candidate
    assert checkpoint_candidates(tmp_path, ["iter_*.pth"]) == [folder]


# ----------------------------------------------------------------------------- refusals
def test_deepspeed_refusals(monkeypatch, capsys, tmp_path):
    """No DeepSpeed installed (this process), --auto-batch with it, offload without it, and detectron2."""
    from bad_inputs.test_bad_mm_runs import tool_main

    train = tool_main(TRAIN)
    assert train([str(SETR), "--work-dir", str(tmp_path / "a"), "--deepspeed", "zero2"]) == 2
    assert "DeepSpeed is not installed: `pip install -e .[deepspeed]`" in capsys.readouterr().err
    # installed without one of its own requirements: mmengine would swallow the ImportError
    broken = tmp_path / "broken_site" / "deepspeed"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("import a_requirement_left_out_of_the_install\n")
    monkeypatch.syspath_prepend(str(broken.parent))
    assert train([str(SETR), "--work-dir", str(tmp_path / "c"), "--deepspeed", "zero2"]) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed is installed but does not import" in err and "a_requirement_left_out_of_the_install" in err
    assert train([str(SETR), "--work-dir", str(tmp_path / "b"), "--offload-optimizer", "cpu"]) == 2
    assert "--offload-optimizer / --offload-param need --deepspeed" in capsys.readouterr().err
    detectron2 = run_cmd(
        [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", "x.py", "--deepspeed", "zero2"], check=False
    )
    assert detectron2.returncode == 2 and "detectron2's trainer has no DeepSpeed path" in detectron2.stderr
    assert "tools/train.py CONFIG --deepspeed" in detectron2.stderr


def test_auto_batch_with_deepspeed_is_refused(deepspeed_env, fundus_data, tmp_path):
    from test_setr import cfg_options

    env = {**deepspeed_env, "RAT_DATASETS": str(fundus_data)}
    args = [sys.executable, TRAIN, str(SETR), "--work-dir", str(tmp_path), "--deepspeed", "zero2", "--auto-batch"]
    proc = run_cmd(args + cfg_options(), env=env, check=False)
    assert proc.returncode == 2 and "--auto-batch with --deepspeed" in proc.stderr


# ----------------------------------------------------------------------------- training
def _env(deepspeed_env, data):
    return {**deepspeed_env, "RAT_DATASETS": str(data), "RAT_PLUGINS_SCAN_BACKEND": "torch", "OMP_NUM_THREADS": "1"}


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _convert(folder, out, env):
    run_cmd([sys.executable, CONVERT, str(folder), str(out)], env=env)
    return _weights(out)


def _assert_close(converted, reference, atol):
    assert converted.keys() == reference.keys()
    worst = max((converted[k] - reference[k]).abs().max().item() for k in reference)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory, fundus_data):
    """The plain Runner's 4-iteration SETR runs the DeepSpeed runs are compared with: 1 and 2 processes."""
    from test_setr import cfg_options

    env = {"RAT_DATASETS": str(fundus_data), "RAT_PLUGINS_SCAN_BACKEND": "torch", "OMP_NUM_THREADS": "1"}
    root = tmp_path_factory.mktemp("plain")
    run_cmd([sys.executable, TRAIN, str(SETR), "--work-dir", str(root / "one"), *cfg_options()], env=env)
    run_cmd(["bash", "tools/dist_train.sh", str(SETR), "2", "--work-dir", str(root / "two"), *cfg_options()], env=env)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, atol",
    [
        (["--deepspeed", "zero2"], 0.0),
        (["--deepspeed", "zero2", "--offload-optimizer", "cpu"], 0.0),
        # ZeRO-3 gathers and reduces partitioned parameters: float32 rounding, not another training
        (["--deepspeed", "zero3", "--offload-optimizer", "cpu", "--offload-param", "cpu"], 1e-4),
    ],
    ids=["zero2", "zero2_offload_optimizer", "zero3_offload_all"],
)
def test_one_process_trains_as_the_plain_runner(deepspeed_env, fundus_data, plain_runs, tmp_path, flags, atol):
    from test_setr import cfg_options

    env = _env(deepspeed_env, fundus_data)
    work = tmp_path / "ds"
    run_cmd([sys.executable, TRAIN, str(SETR), "--work-dir", str(work), *flags, *cfg_options()], env=env)
    assert list((work / "iter_4.pth").glob("*model_states.pt")) and list((work / "iter_4.pth").glob("*optim_states.pt"))
    assert not list(work.glob(".*partial")) and not list(work.glob(".*stale"))
    written = json.loads((work / "deepspeed_config.json").read_text())
    assert written["zero_optimization"]["stage"] == int(flags[1][-1]) and written["train_micro_batch_size_per_gpu"] == 2
    _assert_close(
        _convert(work / "iter_4.pth", tmp_path / "plain.pth", env), _weights(plain_runs / "one" / "iter_4.pth"), atol
    )
    final = json.loads((work / "final_metrics.json").read_text())
    assert final["iter"] == 4 and "mIoU" in final["val"]


@pytest.mark.slow
def test_a_frozen_encoder_gets_no_zero_optimizer_state_and_stays_in_the_checkpoint(
    deepspeed_env, fundus_data, tmp_path
):
    from test_setr import cfg_options

    env = _env(deepspeed_env, fundus_data)
    work = tmp_path / "frozen"
    flags = ["--deepspeed", "zero2", *cfg_options(model__backbone__frozen=True)]
    run_cmd([sys.executable, TRAIN, str(SETR), "--work-dir", str(work), *flags], env=env)
    # DeepSpeed's files pickle DeepSpeed's objects: read them where DeepSpeed is installed
    inspect = f"""
import json, torch
load = lambda name: torch.load({str(work / "iter_4.pth")!r} + "/" + name, map_location="cpu", weights_only=False)
states = load("mp_rank_00_model_states.pt")
shard = load("zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
print(json.dumps(dict(
    trainable=sum(torch.Size(s).numel() for group in states["param_shapes"] for s in group.values()),
    frozen={{k: torch.Size(s).numel() for k, s in states["frozen_param_shapes"].items()}},
    optimized=sum(t.numel() for t in shard["single_partition_of_fp32_groups"]) - sum(shard["group_paddings"]),
)))
"""
    found = json.loads(run_cmd([sys.executable, "-c", inspect], env=env).stdout.strip().splitlines()[-1])
    assert found["optimized"] == found["trainable"]  # the ViT encoder: no optimizer state at all
    assert sum(found["frozen"].values()) > 10 * found["trainable"]
    assert all(name.startswith("backbone.") for name in found["frozen"])
    converted = _convert(work / "iter_4.pth", tmp_path / "plain.pth", env)
    assert set(found["frozen"]) <= set(converted)  # a converted checkpoint loads strictly


@pytest.mark.slow
def test_two_processes_zero2_train_as_two_plain_processes(deepspeed_env, fundus_data, plain_runs, tmp_path):
    from test_setr import cfg_options

    env = _env(deepspeed_env, fundus_data)
    work = tmp_path / "ds"
    run_cmd(
        [
            "bash",
            "tools/dist_train.sh",
            str(SETR),
            "2",
            "--work-dir",
            str(work),
            "--deepspeed",
            "zero2",
            *cfg_options(),
        ],
        env=env,
    )
    shards = sorted(p.name for p in (work / "iter_4.pth").glob("zero_pp_rank_*"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    _assert_close(
        _convert(work / "iter_4.pth", tmp_path / "plain.pth", env), _weights(plain_runs / "two" / "iter_4.pth"), 1e-6
    )


@pytest.mark.slow
def test_sigterm_then_resume_under_zero2_ends_where_the_uninterrupted_run_does(deepspeed_env, fundus_data, tmp_path):
    """Stopped by SIGTERM (a checkpoint folder at the next iteration), resumed with --resume, a ZeRO-2 run ends
    with the uninterrupted ZeRO-2 run's weights; its converted checkpoint scores in tools/test.py what the
    run's own last validation scored."""
    from bad_inputs.test_bad_mm_runs import LONG, Background
    from test_setr import cfg_options

    env = _env(deepspeed_env, fundus_data)
    short = dict(LONG, train_cfg__max_iters=30, param_scheduler__0__end=30, train_cfg__val_interval=30)

    def args(work, *flags):
        return [sys.executable, TRAIN, str(SETR), "--work-dir", str(work), "--deepspeed", "zero2", *flags]

    work = tmp_path / "stopped"
    first = Background(args(work) + cfg_options(**short), env, tmp_path / "first.log")
    first.wait_for(r"Iter\(train\) \[\s*4/")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 0, first.text()[-3000:]
    stopped = int(re.search(r"SIGTERM: stopping after iteration (\d+)", first.text()).group(1))
    assert stopped < 29 and list((work / f"iter_{stopped}.pth").glob("*optim_states.pt"))
    resumed = run_cmd(args(work, "--resume") + cfg_options(**short), env=env)
    assert f"resumed epoch: 0, iter: {stopped}" in resumed.stdout + resumed.stderr
    whole = tmp_path / "uninterrupted"
    run_cmd(args(whole) + cfg_options(**short), env=env)
    converted = _convert(work / "iter_30.pth", tmp_path / "iter_30_plain.pth", env)
    _assert_close(converted, _convert(whole / "iter_30.pth", tmp_path / "whole.pth", env), 0.0)
    out = run_cmd(
        [sys.executable, "tools/test.py", str(SETR), str(tmp_path / "iter_30_plain.pth"), "--work-dir", str(tmp_path)]
        + cfg_options(**short),
        env=env,
    )
    tested = float(re.search(r"Iter\(test\).*mIoU: ([\d.]+)", out.stdout + out.stderr).group(1))
    validated = json.loads((work / "final_metrics.json").read_text())["val"]["mIoU"]
    assert tested == pytest.approx(validated, abs=1e-3)


def test_converter_refuses_what_is_not_a_deepspeed_checkpoint(deepspeed_env, tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.pth")
    proc = run_cmd(
        [sys.executable, CONVERT, str(tmp_path / "plain.pth"), str(tmp_path / "out.pth")],
        env=deepspeed_env,
        check=False,
    )
    assert proc.returncode == 2 and "it is not a DeepSpeed checkpoint folder" in proc.stderr
    assert not (tmp_path / "out.pth").exists()
