"""Running on clusters: where a process runs (SLURM, LSF, torchrun, MPI) and its distributed coordinates."""

from .environment import ProcessEnvironment, detect_environment, expand_hostlist, master_port_for_job

__all__ = ["ProcessEnvironment", "detect_environment", "expand_hostlist", "master_port_for_job"]
