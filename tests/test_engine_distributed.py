"""close_process_group joins gloo's worker threads before the interpreter finalizes (a thread left
running then aborts the process when it drops its last tensor: the former 2-process flake)."""

import sys

from _helpers import run_cmd

CHECK = r"""
import os, sys, tempfile
import torch, torch.distributed as dist
import torch.distributed.nn.functional  # imported before the group, as mmengine does
from torch.nn.parallel import DistributedDataParallel
from rat_plugins.engine.distributed import close_process_group


def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return sorted(n for n in names if n.startswith(("pt_gloo", "gloo")))


store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)


class Run:  # like a finished Runner: the DDP model is reachable only through a reference cycle
    def __init__(self):
        self.model = DistributedDataParallel(torch.nn.Linear(4, 2))
        self.loop = self
        self.model(torch.ones(3, 4)).sum().backward()


Run()
assert gloo_threads(), "a gloo group runs worker threads"
assert close_process_group() is True and not dist.is_initialized()
assert gloo_threads() == [], gloo_threads()
assert close_process_group() is False  # nothing left to close
print("ok")
"""


def test_close_process_group_leaves_no_gloo_thread():
    proc = run_cmd([sys.executable, "-c", CHECK])
    assert proc.stdout.strip().endswith("ok")
