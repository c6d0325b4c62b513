"""Stopping a training run on a signal with a checkpoint instead of a loss.

SIGTERM (a scheduler's preemption or ``kill``), SIGINT (Ctrl-C) and, on request, a scheduler's
warning signal (SLURM ``--signal=USR1@90``) only set a flag here; the training loop's hook sees it
at the next iteration boundary, saves a checkpoint and ends the run with exit status 0. Saving
inside the handler could interrupt a half-written optimizer step or checkpoint. A second SIGINT
falls through to Python's default (KeyboardInterrupt), so an impatient user can still stop at once.
Processes forked after :meth:`GracefulStop.install` (data-loader workers) inherit the handler and
ignore these signals: the process that installed it stops them, and a worker killed by Ctrl-C or
a scheduler's SIGTERM to the whole job would crash the loop before it could save.
"""

import logging
import os
import signal
import threading
from typing import Callable, Iterable, Optional

__all__ = ["GracefulStop", "DEFAULT_STOP_SIGNALS", "signal_name", "die_with_parent", "DIE_WITH_PARENT"]

logger = logging.getLogger(__name__)
DEFAULT_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class GracefulStop:
    """Records stop signals until :meth:`restore`; ``requested`` holds the first one's name.

    Installing is a no-op outside the main thread (Python allows handlers only there), so a
    trainer running in a worker thread still trains, without this protection.

    Args:
        signals: signal numbers to catch (default SIGTERM and SIGINT).
        extra_from_env: name of an environment variable listing more signals by name
            (``RAT_STOP_SIGNALS=USR1,USR2``), so a job script can add its scheduler's warning signal.
        on_request: called with the signal's name on the first one (e.g. to pass the stop on to
            child processes); runs inside the signal handler, so keep it short.
    """

    def __init__(
        self,
        signals: Iterable[int] = DEFAULT_STOP_SIGNALS,
        extra_from_env: str = "RAT_STOP_SIGNALS",
        on_request: Optional[Callable[[str], None]] = None,
    ):
        wanted = list(signals)
        for name in filter(None, (s.strip() for s in os.environ.get(extra_from_env, "").split(","))):
            name = name.upper()
            number = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
            if number is None:
                raise ValueError(f"${extra_from_env} names an unknown signal {name!r} (e.g. USR1, TERM)")
            wanted.append(int(number))
        self.signals = list(dict.fromkeys(wanted))
        self.requested: Optional[str] = None
        self.on_request = on_request
        self._previous = {}
        self._installer_pid: Optional[int] = None

    def install(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            return self
        self._installer_pid = os.getpid()
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self._installer_pid is not None and os.getpid() != self._installer_pid:
            return  # a forked worker: its parent decides when it stops
        if self.requested is not None and signum == signal.SIGINT:
            # second Ctrl-C: stop now, as Python would
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signal_name(signum)
            logger.warning(
                "received %s: saving a checkpoint at the end of this iteration, then stopping "
                "(send SIGINT again to stop without one)",
                self.requested,
            )
            if self.on_request is not None:
                self.on_request(self.requested)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> "GracefulStop":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


DIE_WITH_PARENT = "RAT_DIE_WITH_PARENT"  # set by an engine whose workers may be torn down (tools/ray_train.py)


def die_with_parent(only_when_asked: bool = False) -> None:
    """This process gets SIGKILL when its parent ends (Linux ``PR_SET_PDEATHSIG``): a training process
    whose launcher was killed does not live on holding a work dir or waiting on a collective.
    ``only_when_asked``: only under ``$RAT_DIE_WITH_PARENT=1``."""
    if only_when_asked and os.environ.get(DIE_WITH_PARENT) != "1":
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
