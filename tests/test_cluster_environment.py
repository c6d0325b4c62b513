"""Environment detection: each launcher's variables (as SLURM, LSF, torchrun and Open MPI set them)."""

import socket

import pytest

from rat_plugins.cluster import detect_environment, expand_hostlist, master_port_for_job


def test_local_without_any_launcher():
    env = detect_environment({})
    assert (env.launcher, env.rank, env.world_size, env.distributed) == ("local", 0, 1, False)
    assert env.master_port == 29500 and env.job_id is None


def test_torchrun_variables():
    env = detect_environment(
        dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", GROUP_RANK="1", MASTER_ADDR="n1")
    )
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.node_rank, env.num_nodes) == (
        "torchrun",
        3,
        4,
        1,
        1,
        2,
    )
    assert env.torch_env()["MASTER_ADDR"] == "n1"


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("a[9-11]", ["a9", "a10", "a11"]),
    ],
)
def test_slurm_hostlists(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


def test_slurm_batch_shell_is_one_process():
    """sbatch sets SLURM_NTASKS / SLURM_PROCID in the batch shell; only srun makes a world."""
    env = detect_environment(dict(SLURM_JOB_ID="4242", SLURM_NTASKS="8", SLURM_PROCID="0", SLURM_NODELIST="g[1-2]"))
    assert (env.launcher, env.world_size, env.job_id, env.scheduler) == ("slurm-batch", 1, "4242", "slurm")


def test_slurm_srun_task():
    env = detect_environment(
        dict(
            SLURM_JOB_ID="4242",
            SLURM_STEP_NUM_TASKS="4",
            SLURM_STEP_NUM_NODES="2",
            SLURM_STEP_NODELIST="gpu[07-08]",
            SLURM_STEP_TASKS_PER_NODE="2(x2)",
            SLURM_PROCID="3",
            SLURM_LOCALID="1",
            SLURM_NODEID="1",
        )
    )
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 3, 4, 1, 2)
    assert (env.node_rank, env.num_nodes, env.master_addr) == (1, 2, "gpu07")
    assert env.master_port == master_port_for_job("4242") != 29500


def test_two_jobs_on_one_node_get_different_ports():
    ports = {master_port_for_job(str(j)) for j in range(1000, 1010)}
    assert len(ports) == 10 and all(20000 <= p < 40000 for p in ports)
    assert master_port_for_job("77_3") != master_port_for_job("77_4")
    assert detect_environment(dict(SLURM_JOB_ID="5", SLURM_STEP_NUM_TASKS="1", MASTER_PORT="1234")).master_port == 1234


def test_slurm_array_job_id():
    env = detect_environment(dict(SLURM_JOB_ID="901", SLURM_ARRAY_JOB_ID="900", SLURM_ARRAY_TASK_ID="1"))
    assert env.job_id == "900_1"


def test_lsf_jsrun():
    env = detect_environment(
        dict(
            LSB_JOBID="77",
            LSB_MCPU_HOSTS="batch1 1 c1 4 c2 4",
            JSM_NAMESPACE_RANK="5",
            JSM_NAMESPACE_SIZE="8",
            JSM_NAMESPACE_LOCAL_RANK="1",
            JSM_NAMESPACE_LOCAL_SIZE="4",
        )
    )
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.node_rank, env.num_nodes) == (
        "lsf-jsrun",
        5,
        8,
        1,
        1,
        2,
    )
    assert env.master_addr == "batch1" and env.scheduler == "lsf"


def test_lsf_blaunch_rank_from_host_file(tmp_path, monkeypatch):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("c1\nc1\nc2\nc2\nc3\nc3\n")  # one line per slot
    monkeypatch.setattr(socket, "gethostname", lambda: "c2.cluster.example")
    env = detect_environment(dict(LSB_JOBID="9", LSB_DJOB_HOSTFILE=str(hostfile), RAT_LAUNCHER="blaunch"))
    assert (env.launcher, env.rank, env.world_size, env.master_addr) == ("lsf-blaunch", 1, 3, "c1")
    monkeypatch.setattr(socket, "gethostname", lambda: "elsewhere")
    with pytest.raises(ValueError, match="not in the LSF job's host list"):
        detect_environment(dict(LSB_JOBID="9", LSB_DJOB_HOSTFILE=str(hostfile), RAT_LAUNCHER="blaunch"))
    # the batch shell of an LSF job (no blaunch): one process
    assert detect_environment(dict(LSB_JOBID="9", LSB_DJOB_HOSTFILE=str(hostfile))).launcher == "lsf-batch"


def test_open_mpi():
    env = detect_environment(
        dict(
            OMPI_COMM_WORLD_RANK="2",
            OMPI_COMM_WORLD_SIZE="4",
            OMPI_COMM_WORLD_LOCAL_RANK="0",
            OMPI_COMM_WORLD_LOCAL_SIZE="2",
            SLURM_JOB_ID="3",
            SLURM_JOB_NODELIST="n[5-6]",
        )
    )
    assert (env.launcher, env.rank, env.world_size, env.node_rank, env.master_addr) == ("mpi", 2, 4, 1, "n5")


def test_bad_launcher_value_names_the_variable():
    with pytest.raises(ValueError, match=r"\$SLURM_PROCID='x' is not an integer"):
        detect_environment(dict(SLURM_JOB_ID="1", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="x"))


def test_requeue_commands():
    from rat_plugins.cluster.requeue import requeue_command, requeue_current_job

    assert requeue_command({}) is None
    assert requeue_command({"SLURM_JOB_ID": "41"}) == ["scontrol", "requeue", "41"]
    array_task = {"SLURM_JOB_ID": "45", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "2"}
    assert requeue_command(array_task) == ["scontrol", "requeue", "40_2"]
    assert requeue_command({"LSB_JOBID": "7", "LSB_JOBINDEX": "3"}) == ["brequeue", "7[3]"]
    assert requeue_command({"SLURM_JOB_ID": "41", "RAT_NO_REQUEUE": "1"}) is None
    assert requeue_current_job({}) == (False, "not in a scheduler job (or RAT_NO_REQUEUE=1): not requeued")


def test_env_command_prints_what_the_tools_see():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LSB_", "OMPI_"))}
    env.update(SLURM_JOB_ID="77", SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="1", SLURM_STEP_NODELIST="gpu[3-4]")
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-m", "rat_plugins", "env"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for line in ("launcher: slurm", "rank: 1", "world_size: 2", "master_addr: gpu3", "job_id: 77"):
        assert line in proc.stdout.splitlines(), proc.stdout
    env["SLURM_PROCID"] = "x"
    proc = subprocess.run([sys.executable, "-m", "rat_plugins", "env"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "$SLURM_PROCID='x' is not an integer" in proc.stderr
