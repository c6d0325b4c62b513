"""tools/submit.py: job scripts for both tool families and both schedulers, the site file, bad options,
and the per-node launcher's commands."""

import pytest

from rat_plugins.cluster.environment import detect_environment
from rat_plugins.cluster.launch import node_command
from rat_plugins.cluster.submit import config_tool_family, main as submit_main

from _helpers import REPO, run_cmd

OFAT = "projects/ViTDet/configs/OFAT/baseline_lr0.001_bs8_adamw_ep100.py"
SETR = "projects/SETR/configs/setr_vit-s16_mla_fundus.py"


@pytest.mark.parametrize(
    "config, family",
    [
        (OFAT, "detectron2"),
        ("projects/RAT/configs/coco/rat_fpn_3level_coco.py", "detectron2"),
        (SETR, "openmmlab"),
        ("projects/YOLOX/configs/yolox_vim-tiny_heads.py", "openmmlab"),
        ("projects/RVT/configs/patch2_4scale_sizeaware_200k.py", "openmmlab"),
        ("projects/RAT/configs/rat_isic_triple_256-128-64.py", "openmmlab"),
    ],
)
def test_tool_family_is_read_from_the_config(config, family):
    assert config_tool_family(REPO / config) == family


def _dry_run(capsys, *argv):
    assert submit_main([*argv, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_sbatch_script_detectron2(capsys, tmp_path):
    out = _dry_run(
        capsys,
        OFAT,
        "--scheduler",
        "slurm",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--time",
        "04:00:00",
        "--partition",
        "gpu",
        "--account",
        "lab",
        "--qos",
        "high",
        "--constraint",
        "a100",
        "--mem",
        "64G",
        "--cpus-per-task",
        "16",
        "--extra=--exclusive",
        "--setup",
        "module load cuda",
        "--work-dir",
        str(tmp_path / "run"),
        "train.max_iter=10",
    )
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=04:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --mem=64G",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=USR2@90",
        f"#SBATCH --output={tmp_path}/run/slurm-%j.out",
        "module load cuda",
        "export RAT_STOP_SIGNALS=USR2",
    ]:
        assert line in out, line
    launch = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "rat_plugins.cluster.launch --procs-per-node 4 tools/lazyconfig_train_net.py --config-file" in launch
    assert launch.endswith(f"--resume train.output_dir={tmp_path}/run train.max_iter=10")
    assert "# submit with: sbatch --parsable" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_bsub_script_openmmlab_matches_expectation(capsys, tmp_path):
    out = _dry_run(
        capsys,
        SETR,
        "--scheduler",
        "lsf",
        "--nodes",
        "3",
        "--gpus-per-node",
        "2",
        "--time",
        "1-02:30:00",
        "--partition",
        "gpuq",
        "--account",
        "proj",
        "--signal",
        "USR1@120",
        "--work-dir",
        str(tmp_path / "w"),
        "train_cfg.max_iters=5",
    )
    directives = [line for line in out.splitlines() if line.startswith("#BSUB")]
    assert directives == [
        "#BSUB -J setr_vit-s16_mla_fundus",
        "#BSUB -n 3",
        '#BSUB -R "span[ptile=1]"',
        f"#BSUB -o {tmp_path}/w/lsf-%J.out",
        "#BSUB -wa USR1",
        "#BSUB -wt 2",
        "#BSUB -r",
        '#BSUB -gpu "num=2"',
        "#BSUB -W 26:30",
        "#BSUB -q gpuq",
        "#BSUB -P proj",
    ]
    launch = next(line for line in out.splitlines() if line.startswith("blaunch "))
    assert "env RAT_LAUNCHER=blaunch" in launch
    assert launch.endswith(
        f"--procs-per-node 2 tools/train.py {SETR} --work-dir {tmp_path}/w --resume --cfg-options train_cfg.max_iters=5"
    )


def test_site_file_settings_and_flags_win(capsys, tmp_path):
    site = tmp_path / "cluster.toml"
    site.write_text(
        'partition = "shared"\nsetup = ["source /opt/venv/bin/activate"]\n'
        '[slurm]\naccount = "site-acct"\nextra = ["#SBATCH --exclusive"]\n[lsf]\nqueue = "lsfq"\n'
    )
    out = _dry_run(capsys, OFAT, "--scheduler", "slurm", "--site", str(site), "--partition", "mine")
    assert "#SBATCH --partition=mine" in out and "#SBATCH --account=site-acct" in out
    assert "#SBATCH --exclusive" in out and "source /opt/venv/bin/activate" in out
    out = _dry_run(capsys, OFAT, "--scheduler", "lsf", "--site", str(site))
    assert "#BSUB -q lsfq" in out and "site-acct" not in out


def _refused_dry_run(*argv):
    """tools/submit.py --dry-run in a fresh process; its stderr, after checking exit 2 and no traceback."""
    cmd = [str(REPO / ".venv/bin/python"), "tools/submit.py", *argv, "--dry-run", "--scheduler", "slurm"]
    proc = run_cmd(cmd, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["projects/nope.py"], "projects/nope.py"),
        ([OFAT, "--nodes", "0"], "--nodes must be >= 1"),
        ([OFAT, "--signal", "USR2"], "expected SIGNAL@SECONDS"),
        ([OFAT, "--site", "/nonexistent/cluster.toml"], "site file not found"),
    ],
)
def test_bad_submit_options_are_one_clear_error(argv, message, tmp_path):
    assert message in _refused_dry_run(*argv)


def test_bad_site_file_names_the_setting(tmp_path):
    site = tmp_path / "cluster.toml"
    site.write_text('partiton = "gpu"\n')
    assert "unknown settings ['partiton']" in _refused_dry_run(OFAT, "--site", str(site))
    site.write_text("partition = \n")
    assert "is not valid TOML" in _refused_dry_run(OFAT, "--site", str(site))


def test_launcher_commands_per_family():
    one_node = detect_environment({"SLURM_JOB_ID": "12", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NODELIST": "n1"})
    cmd = node_command("tools/lazyconfig_train_net.py", ["--config-file", "c.py"], 2, one_node)
    assert cmd[1:] == [
        "tools/lazyconfig_train_net.py",
        "--num-gpus",
        "2",
        "--num-machines",
        "1",
        "--machine-rank",
        "0",
        "--dist-url",
        f"tcp://n1:{one_node.master_port}",
        "--config-file",
        "c.py",
    ]
    second_of_two = detect_environment(
        {
            "SLURM_JOB_ID": "12",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_NUM_NODES": "2",
            "SLURM_PROCID": "1",
            "SLURM_NODEID": "1",
            "SLURM_STEP_NODELIST": "n[1-2]",
        }
    )
    cmd = node_command("tools/train.py", ["cfg.py", "--resume"], 4, second_of_two)
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--node_rank=1",
        "--nproc_per_node=4",
        "--master_addr=n1",
        f"--master_port={second_of_two.master_port}",
        "tools/train.py",
        "cfg.py",
        "--resume",
        "--launcher",
        "pytorch",
    ]
    with pytest.raises(ValueError, match="unknown tool"):
        node_command("tools/demo.py", [], 1, one_node)


def test_ofat_sweep_manifest_lists_the_nine_runs(tmp_path):
    out = tmp_path / "sweep.json"
    run_cmd(
        [
            str(REPO / ".venv/bin/python"),
            "-m",
            "rat_plugins.experiments.ofat",
            "sweep-manifest",
            str(out),
            "--quick",
            "--work-dirs",
            str(tmp_path),
            "train.seed=3",
        ]
    )
    import json

    manifest = json.loads(out.read_text())
    assert len(manifest["runs"]) == 9 and manifest["runs"][0]["name"].startswith("baseline")
    first = manifest["runs"][0]
    assert first["work_dir"] == str(tmp_path / f"ofat_{first['name']}_quick")
    assert "train.epochs=24" in first["overrides"] and first["overrides"][-1] == "train.seed=3"
    assert manifest["summary"][-2:] == ["--work-dirs", str(tmp_path)]
    proc = run_cmd(
        [
            str(REPO / ".venv/bin/python"),
            "-m",
            "rat_plugins.experiments.ofat",
            "sweep-manifest",
            str(out),
            "--names",
            "x",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "unknown OFAT configs ['x']" in proc.stderr


def test_run_all_ofat_submit_writes_one_job_array(tmp_path):
    proc = run_cmd(
        ["bash", "run_all_ofat.sh", "--quick", "train.seed=1", "--submit", "--dry-run", "--max-parallel", "3"],
        env={"RAT_WORK_DIRS": str(tmp_path)},
    )
    assert "#SBATCH --array=0-8%3" in proc.stdout
    assert f"rat_plugins.cluster.sweep task {tmp_path}/ofat_sweep_quick.json" in proc.stdout
    import json

    runs = json.loads((tmp_path / "ofat_sweep_quick.json").read_text())["runs"]
    assert len(runs) == 9 and all(r["overrides"][-1] == "train.seed=1" for r in runs)
    bad = run_cmd(["bash", "run_all_ofat.sh", "--num-gpus", "2", "--submit"], check=False)
    assert bad.returncode == 2 and "--num-gpus does not go with --submit" in bad.stderr
