"""Jobs through a real SLURM on localhost (tools/local_slurm.sh, started by the ``slurm_cluster`` fixture)."""

import json
import os
import subprocess
import sys

import pytest

from _helpers import REPO

pytestmark = pytest.mark.slurm


def _slurm(args, env, **kwargs):
    return subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, **kwargs)


def test_detection_inside_srun_and_batch_shell(slurm_cluster, tmp_path):
    """Each srun task sees its own rank in a 2-task world; the batch shell is one process."""
    probe = (
        "import json; from rat_plugins.cluster import detect_environment as d; "
        "e = d(); print(json.dumps(dict(launcher=e.launcher, rank=e.rank, world=e.world_size, "
        "local=e.local_rank, master=e.master_addr, port=e.master_port, job=e.job_id)))"
    )
    script = tmp_path / "job.sh"
    script.write_text(
        f"#!/bin/bash\n#SBATCH -n 2\n#SBATCH -o {tmp_path}/out.txt\ncd {REPO}\n"
        f"{sys.executable} -c '{probe}'\n"
        f"srun -n 2 {sys.executable} -c '{probe}'\n"
    )
    submitted = _slurm(["sbatch", "--parsable", "--wait", str(script)], slurm_cluster)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    rows = [json.loads(line) for line in (tmp_path / "out.txt").read_text().splitlines() if line.startswith("{")]
    batch, tasks = rows[0], sorted(rows[1:], key=lambda r: r["rank"])
    assert (batch["launcher"], batch["world"], batch["job"]) == ("slurm-batch", 1, job_id)
    assert [(t["launcher"], t["rank"], t["world"]) for t in tasks] == [("slurm", 0, 2), ("slurm", 1, 2)]
    assert {t["master"] for t in tasks} == {"localhost"} and tasks[0]["port"] == tasks[1]["port"] != 29500
