"""Put the current scheduler job back in the queue after a stop signal, so it resumes from its checkpoint.

The training hooks call :func:`requeue_current_job` on rank 0 once the checkpoint is complete. On
SLURM it runs ``scontrol requeue`` on the job (``<array job>_<task>`` for an array task, so only
that task comes back; the job script asks for ``--requeue``), on LSF ``brequeue``. Outside a
scheduler nothing happens: a stop on a workstation only checkpoints and exits.
"""

import logging
import os
import subprocess
from typing import List, Mapping, Optional, Tuple

__all__ = ["requeue_command", "requeue_current_job", "REQUEUE_EXIT_CODE"]

logger = logging.getLogger(__name__)
# exit status after a requeue: SLURM ignores it (the requeue already ended the job), LSF's
# REQUEUE_EXIT_VALUES can name it; 0 elsewhere (a clean, checkpointed stop)
REQUEUE_EXIT_CODE = 0


def requeue_command(environ: Optional[Mapping[str, str]] = None) -> Optional[List[str]]:
    """The command that requeues the job this process runs in, or None outside a scheduler."""
    env = os.environ if environ is None else environ
    if env.get("RAT_NO_REQUEUE") == "1":
        return None
    if env.get("SLURM_JOB_ID"):
        array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        return ["scontrol", "requeue", f"{array}_{task}" if array and task else env["SLURM_JOB_ID"]]
    if env.get("LSB_JOBID"):
        index = env.get("LSB_JOBINDEX")
        job = f"{env['LSB_JOBID']}[{index}]" if index and index != "0" else env["LSB_JOBID"]
        return ["brequeue", job]
    return None


def requeue_current_job(environ: Optional[Mapping[str, str]] = None) -> Tuple[bool, str]:
    """Requeue the current job; (whether it was requeued, what happened, for the log)."""
    command = requeue_command(environ)
    if command is None:
        return False, "not in a scheduler job (or RAT_NO_REQUEUE=1): not requeued"
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"{' '.join(command)} failed: {e}"
    if proc.returncode != 0:
        return False, f"{' '.join(command)} failed ({proc.returncode}): {proc.stderr.strip()}"
    return True, f"requeued: {' '.join(command)}"
