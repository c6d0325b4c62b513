"""Leave torch.distributed while the interpreter is still whole.

A process that exits with its gloo process group alive lets Python finalize while the group's worker
threads (``pt_gloo_runloop``) still run. When such a thread then drops its reference to a tensor that
has a Python object, it needs the GIL; during finalization taking the GIL ends the thread
(``pthread_exit``), the unwind meets a ``noexcept`` frame and the process aborts: "terminate called
without an active exception", SIGABRT, and torchrun reports the run as failed after it finished.
Destroying the group before the interpreter shuts down joins those threads (torch releases the GIL
while a process group is destroyed), so nothing runs behind Python's back at exit.
"""

import contextlib
import gc

import torch.distributed as dist

__all__ = ["close_process_group", "closing_process_group"]


def close_process_group() -> bool:
    """Destroy the default process group, if there is one, and return whether there was.

    Call it once the run's objects are out of scope: the group (and its threads) ends only with its
    last reference, and a finished Runner's DistributedDataParallel wrapper holds one through
    reference cycles, hence the collection. (``torch.distributed.nn.functional`` imported for the
    first time while a group exists keeps it in its default arguments for good; mmengine imports it
    before, at import time.)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    gc.collect()
    return True


@contextlib.contextmanager
def closing_process_group():
    """``with closing_process_group(): status = main()``: the group is destroyed however the block ends."""
    try:
        yield
    finally:
        close_process_group()
