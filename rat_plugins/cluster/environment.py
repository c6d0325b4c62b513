"""Where this process runs and its place in a distributed job, from the launcher's environment.

One answer for both tool families: a laptop, torchrun / ``accelerate launch``, tasks started by
SLURM's ``srun``, LSF's ``jsrun`` or ``blaunch``, and MPI (Open MPI's ``mpirun``). Traps handled:

- SLURM sets ``SLURM_NTASKS`` and ``SLURM_PROCID`` in a batch shell that never ran ``srun``; that
  shell is one process, not a world. Only a job step (``srun``) sets ``SLURM_STEP_NUM_TASKS``.
- torchrun inside an ``srun`` task (one task per node) sets ``RANK`` etc.: torchrun's numbers win.
- LSF's ``blaunch`` sets no rank: the job scripts start one task per host and mark it with
  ``RAT_LAUNCHER=blaunch``; the rank is the host's position in the job's host list.
- The master address is the first host of the step's / job's node list, parsed here
  (``node[01-03,7],gpu1``), with ``scontrol show hostnames`` as the fallback.
- Without ``MASTER_PORT`` the port is derived from the job id, so two jobs sharing a node do not
  collide on torch's default port.
"""

import dataclasses
import os
import re
import socket
import subprocess
from typing import Dict, List, Mapping, Optional

__all__ = [
    "free_port",
    "ProcessEnvironment",
    "adopt_environment",
    "coordinates_line",
    "detect_environment",
    "expand_hostlist",
    "master_port_for_job",
    "DEFAULT_MASTER_PORT",
]

DEFAULT_MASTER_PORT = 29500  # torch.distributed's default
_ADOPTED = "RAT_ADOPTED_LAUNCHER"
_PORT_BASE, _PORT_SPAN = 20000, 20000  # derived ports: 20000..39999, below Linux's ephemeral range


@dataclasses.dataclass(frozen=True)
class ProcessEnvironment:
    """This process's coordinates. ``launcher``: local, torchrun, slurm, slurm-batch, lsf-jsrun,
    lsf-blaunch, lsf-batch or mpi (``*-batch``: the scheduler's batch shell, one process)."""

    launcher: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    job_id: Optional[str] = None
    scheduler: Optional[str] = None  # slurm / lsf, when inside a job
    hostname: str = dataclasses.field(default_factory=socket.gethostname)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def torch_env(self) -> Dict[str, str]:
        """The variables torch.distributed's ``env://`` initialisation reads."""
        return dict(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )

    def describe(self) -> str:
        job = f", {self.scheduler} job {self.job_id}" if self.job_id else ""
        return (
            f"host {self.hostname}: rank {self.rank}/{self.world_size}, local rank {self.local_rank}/"
            f"{self.local_world_size}, node {self.node_rank}/{self.num_nodes}, launcher {self.launcher}{job}, "
            f"master {self.master_addr}:{self.master_port}"
        )


def _expand_range(prefix: str, body: str, suffix: str) -> List[str]:
    out = []
    for part in body.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            out += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(f"{prefix}{part}{suffix}")
    return out


def expand_hostlist(hostlist: str) -> List[str]:
    """SLURM's compressed host list (``gpu[01-03,07],login1``) as host names, in order."""
    hosts, token, depth, parts = [], "", 0, []  # split on the commas outside brackets
    for ch in hostlist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(token)
            token = ""
        else:
            token += ch
    parts.append(token)
    for part in filter(None, (p.strip() for p in parts)):
        match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, body, rest = match.groups()
        expanded = _expand_range(prefix, body, "")
        # a second bracket group (rack[1-2]-node[1-2]) expands against each of the first
        hosts += [h2 for h in expanded for h2 in (expand_hostlist(h + rest) if "[" in rest else [h + rest])]
    return hosts


def _scontrol_hostnames(hostlist: str) -> List[str]:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return out.split()


def _first_host(hostlist: Optional[str]) -> Optional[str]:
    if not hostlist:
        return None
    try:
        hosts = expand_hostlist(hostlist)
    except ValueError:  # a syntax this parser does not know: ask SLURM
        hosts = _scontrol_hostnames(hostlist)
    return hosts[0] if hosts else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (``""``: on every interface, for processes of other nodes)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def master_port_for_job(job_id: Optional[str]) -> int:
    """A port in 20000..39999 derived from the job id (array jobs ``123_4`` included)."""
    if not job_id:
        return DEFAULT_MASTER_PORT
    digits = re.sub(r"\D", "", str(job_id))
    number = int(digits) if digits else sum(map(ord, str(job_id)))
    return _PORT_BASE + number % _PORT_SPAN


def _int(env: Mapping[str, str], key: str, default: int = 0) -> int:
    value = env.get(key)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise ValueError(f"${key}={value!r} is not an integer (set by the launcher; check the job script)") from None


def _lsf_hosts(env: Mapping[str, str]) -> List[str]:
    """The LSF job's hosts, one entry per host, in allocation order."""
    hostfile = env.get("LSB_DJOB_HOSTFILE")
    names: List[str] = []
    if hostfile and os.path.isfile(hostfile):
        with open(hostfile) as f:
            names = [line.split()[0] for line in f if line.strip()]
    elif env.get("LSB_MCPU_HOSTS"):  # "hostA 4 hostB 4"
        names = env["LSB_MCPU_HOSTS"].split()[0::2]
    elif env.get("LSB_HOSTS"):
        names = env["LSB_HOSTS"].split()
    return list(dict.fromkeys(names))


def _job(env: Mapping[str, str]):
    if env.get("SLURM_JOB_ID"):
        array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        return "slurm", f"{array}_{task}" if array and task else env["SLURM_JOB_ID"]
    if env.get("LSB_JOBID"):
        index = env.get("LSB_JOBINDEX")
        return "lsf", f"{env['LSB_JOBID']}[{index}]" if index and index != "0" else env["LSB_JOBID"]
    return None, None


def _port(env: Mapping[str, str], job_id: Optional[str]) -> int:
    return _int(env, "MASTER_PORT", master_port_for_job(job_id))


def detect_environment(environ: Optional[Mapping[str, str]] = None) -> ProcessEnvironment:
    """Read the launcher's variables (``os.environ`` by default) into a :class:`ProcessEnvironment`."""
    env = os.environ if environ is None else environ
    scheduler, job_id = _job(env)
    common = dict(job_id=job_id, scheduler=scheduler)
    hostname = socket.gethostname()

    # torchrun / accelerate (also inside an srun or blaunch task that runs torchrun)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE", 1)
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        return ProcessEnvironment(
            launcher="torchrun",
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK"),
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", _int(env, "RANK") // max(local_world, 1)),
            num_nodes=max(world // max(local_world, 1), 1),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_port(env, job_id),
            **common,
        )
    # Open MPI
    if "OMPI_COMM_WORLD_RANK" in env:
        world = _int(env, "OMPI_COMM_WORLD_SIZE", 1)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", world)
        master = env.get("MASTER_ADDR") or _first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"))
        if master is None and scheduler == "lsf":
            master = (_lsf_hosts(env) or [None])[0]
        return ProcessEnvironment(
            launcher="mpi",
            rank=_int(env, "OMPI_COMM_WORLD_RANK"),
            world_size=world,
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
            local_world_size=local_world,
            node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK", _int(env, "OMPI_COMM_WORLD_RANK") // max(local_world, 1)),
            num_nodes=max(world // max(local_world, 1), 1),
            master_addr=master or "127.0.0.1",
            master_port=_port(env, job_id),
            **common,
        )
    if scheduler == "slurm":
        if "SLURM_STEP_NUM_TASKS" not in env:  # the batch shell: no srun, one process
            return ProcessEnvironment(
                launcher="slurm-batch", master_addr="127.0.0.1", master_port=_port(env, job_id), **common
            )
        world = _int(env, "SLURM_STEP_NUM_TASKS", 1)
        nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_JOB_NUM_NODES", 1))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        first = re.match(r"(\d+)", tasks_per_node)
        return ProcessEnvironment(
            launcher="slurm",
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID"),
            local_world_size=int(first.group(1)) if first else max(world // max(nodes, 1), 1),
            node_rank=_int(env, "SLURM_NODEID"),
            num_nodes=nodes,
            master_addr=env.get("MASTER_ADDR") or _first_host(nodelist) or "127.0.0.1",
            master_port=_port(env, job_id),
            **common,
        )
    if scheduler == "lsf":
        hosts = _lsf_hosts(env)
        if "JSM_NAMESPACE_RANK" in env:
            world = _int(env, "JSM_NAMESPACE_SIZE", 1)
            local_world = _int(env, "JSM_NAMESPACE_LOCAL_SIZE", 1)
            return ProcessEnvironment(
                launcher="lsf-jsrun",
                rank=_int(env, "JSM_NAMESPACE_RANK"),
                world_size=world,
                local_rank=_int(env, "JSM_NAMESPACE_LOCAL_RANK"),
                local_world_size=local_world,
                node_rank=_int(env, "JSM_NAMESPACE_RANK") // max(local_world, 1),
                num_nodes=max(world // max(local_world, 1), 1),
                master_addr=env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
                master_port=_port(env, job_id),
                **common,
            )
        if env.get("RAT_LAUNCHER") == "blaunch":  # one task per host: rank = the host's index
            short = hostname.split(".")[0]
            index = next((i for i, h in enumerate(hosts) if h.split(".")[0] == short), None)
            if index is None:
                raise ValueError(
                    f"blaunch task on host {hostname}, which is not in the LSF job's host list {hosts} "
                    f"($LSB_DJOB_HOSTFILE / $LSB_MCPU_HOSTS): cannot derive its rank"
                )
            return ProcessEnvironment(
                launcher="lsf-blaunch",
                hostname=hostname,
                rank=index,
                world_size=len(hosts),
                node_rank=index,
                num_nodes=len(hosts),
                master_addr=env.get("MASTER_ADDR") or hosts[0],
                master_port=_port(env, job_id),
                **common,
            )
        return ProcessEnvironment(launcher="lsf-batch", master_port=_port(env, job_id), **common)
    return ProcessEnvironment(launcher="local", master_port=_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT), **common)


def adopt_environment(environ=None) -> Optional[ProcessEnvironment]:
    """When a scheduler started this process as one rank of a world (srun tasks, blaunch, jsrun, MPI),
    export the variables torch.distributed's ``env://`` reads and return the environment; else None.

    torchrun's own variables are already there; a batch shell or a laptop is one process.
    """
    env = detect_environment(environ)
    if not env.distributed or env.launcher == "torchrun":
        return None
    os.environ.update(env.torch_env())
    os.environ[_ADOPTED] = env.launcher  # the launcher that started us, for the logs (RANK now says torchrun)
    return env


def coordinates_line(rank: int, local_rank: int, world_size: int, device) -> str:
    """One line per process at start, so a wrong rank mapping shows in the logs."""
    env = detect_environment()
    job = f", {env.scheduler} job {env.job_id}" if env.job_id else ""
    return (
        f"process on {socket.gethostname()}: rank {rank}/{world_size}, local rank {local_rank}, device {device}, "
        f"launcher {os.environ.get(_ADOPTED) or env.launcher}{job}"
    )
