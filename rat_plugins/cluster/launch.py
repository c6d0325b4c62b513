"""Start a project tool on every node of a job: ``python -m rat_plugins.cluster.launch [--procs-per-node N] TOOL ARGS``.

Job scripts run this once per node (``srun --ntasks-per-node=1``, ``blaunch``, ``jsrun``); it reads
the node's rank, the node count and the master address from the scheduler (see
:mod:`rat_plugins.cluster.environment`) and hands them to the tool family's own multi-process
launcher, then replaces itself with it:

- detectron2 (``tools/lazyconfig_train_net.py``): detectron2's ``launch`` through the tool's
  ``--num-gpus N --num-machines M --machine-rank R --dist-url tcp://MASTER:PORT``;
- OpenMMLab (``tools/train.py`` / ``tools/test.py``): ``torchrun --nnodes M --node_rank R
  --nproc_per_node N --master_addr MASTER --master_port PORT TOOL ARGS --launcher pytorch``.

So one job script has the same shape whichever the tool family; nothing here manages processes.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .environment import ProcessEnvironment, detect_environment

__all__ = ["tool_family_of_tool", "node_command", "main"]

DETECTRON2_TOOLS = ("lazyconfig_train_net.py",)
OPENMMLAB_TOOLS = ("train.py", "test.py")


def tool_family_of_tool(tool: str) -> str:
    name = Path(tool).name
    if name in DETECTRON2_TOOLS:
        return "detectron2"
    if name in OPENMMLAB_TOOLS:
        return "openmmlab"
    raise ValueError(
        f"launch: unknown tool {tool!r}; expected tools/lazyconfig_train_net.py (detectron2) or "
        f"tools/train.py / tools/test.py (mmseg / mmdet)"
    )


def _node_coordinates(env: ProcessEnvironment):
    """(node rank, node count) of this task, which runs once per node."""
    if env.launcher in ("slurm", "lsf-blaunch", "lsf-jsrun", "mpi", "torchrun") and env.world_size > 1:
        # one task per node: the task's rank is the node's rank
        return env.rank, env.world_size
    return 0, 1


def node_command(tool: str, tool_args: Sequence[str], procs_per_node: int, env: ProcessEnvironment) -> List[str]:
    """The command this node runs."""
    node_rank, num_nodes = _node_coordinates(env)
    python = sys.executable
    if tool_family_of_tool(tool) == "detectron2":
        # the flags go first: detectron2's parser takes everything after the first key=value as overrides
        command = [python, tool, "--num-gpus", str(procs_per_node)]
        if num_nodes > 1 or procs_per_node > 1:
            command += [
                "--num-machines",
                str(num_nodes),
                "--machine-rank",
                str(node_rank),
                "--dist-url",
                f"tcp://{env.master_addr}:{env.master_port}",
            ]
        return command + list(tool_args)
    return [
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={num_nodes}",
        f"--node_rank={node_rank}",
        f"--nproc_per_node={procs_per_node}",
        f"--master_addr={env.master_addr}",
        f"--master_port={env.master_port}",
        tool,
        *tool_args,
        "--launcher",
        "pytorch",
    ]


def _ignore_warning_signals_in_agent() -> None:
    """A scheduler signals every process of the job step: torchrun's agent would die of a warning signal
    (USR1 / USR2 terminate by default) and take the training processes with it. Ignored here, the
    signals stay ignored in the agent after exec; the training processes install their own handlers
    (``RAT_STOP_SIGNALS``) and checkpoint."""
    import signal

    for name in filter(None, (s.strip().upper() for s in os.environ.get("RAT_STOP_SIGNALS", "").split(","))):
        number = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
        if number is not None and number not in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, signal.SIG_IGN)


def _parser():
    parser = argparse.ArgumentParser(prog="python -m rat_plugins.cluster.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--procs-per-node", type=int, default=1, help="training processes per node (GPUs, or CPU)")
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
    parser.add_argument("tool", help="tools/lazyconfig_train_net.py, tools/train.py or tools/test.py")
    parser.add_argument("tool_args", nargs=argparse.REMAINDER, help="the tool's own arguments")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.procs_per_node < 1:
        print(f"error: --procs-per-node must be >= 1, got {args.procs_per_node}", file=sys.stderr)
        return 2
    try:
        env = detect_environment()
        command = node_command(args.tool, args.tool_args, args.procs_per_node, env)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[launch] {env.describe()}", file=sys.stderr, flush=True)
    if args.print:
        print(" ".join(command))
        return 0
    # the node's processes get their coordinates from the tool family's launcher, not from srun's
    # task variables (torchrun reads RANK itself; detectron2 takes --machine-rank)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)
    if tool_family_of_tool(args.tool) == "openmmlab":
        _ignore_warning_signals_in_agent()
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
