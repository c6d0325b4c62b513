"""One run per work dir: a lock file naming the owner's pid and host.

Two runs writing checkpoints and metrics into one folder corrupt each other silently, so the second
one refuses. The lock is a JSON file (``.run.lock``) created with O_EXCL. It cannot stay stale
forever: on the same host a lock whose pid is gone is taken over, and the owner refreshes the
file's modification time every ``heartbeat_s``, so a lock from another host (shared file system)
that has not been refreshed for ``stale_after_s`` is taken over too, and so is a lock of the same
scheduler job (a requeued job restarting, possibly on another node: one job never runs twice at
once). Take-overs are logged.
"""

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from ..utils.config_keys import ConfigError

__all__ = ["WorkDirLock", "WorkDirBusyError", "LOCK_NAME"]

logger = logging.getLogger(__name__)
LOCK_NAME = ".run.lock"


def _scheduler_job():
    """The SLURM / LSF job id of this process (an array task's own id), or None."""
    for key in ("SLURM_JOB_ID", "LSB_JOBID"):
        if os.environ.get(key):
            return f"{key.split('_')[0].lower()}:{os.environ[key]}"
    return None


class WorkDirBusyError(ConfigError):
    """Another live run holds the work dir."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkDirLock:
    """Context manager holding ``<work_dir>/.run.lock`` for the life of a run.

    Args:
        work_dir: the run's folder (created if missing).
        what: the command, for the refusal message (``"tools/train.py"``).
        heartbeat_s: how often the owner touches the lock (0: never; tests).
        stale_after_s: a lock untouched for this long is stale, whatever host wrote it.
    """

    def __init__(self, work_dir, what: str = "a run", heartbeat_s: float = 60.0, stale_after_s: float = 600.0):
        self.path = Path(work_dir) / LOCK_NAME
        self.what = what
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = max(stale_after_s, 3 * heartbeat_s)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.held = False

    def _owner_text(self) -> str:
        owner = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
        owner.update(what=self.what, job=_scheduler_job())
        return json.dumps(owner)

    def _read_owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _stale_reason(self, owner: dict) -> Optional[str]:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was just released"
        host, pid = owner.get("host"), owner.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
        job = _scheduler_job()
        if job is not None and owner.get("job") == job and pid != os.getpid():
            return f"it belongs to an earlier run of this job ({job}, requeued)"
        if not owner and age > 60:
            return "it is unreadable and older than a minute"
        if age > self.stale_after_s:
            return f"it was last refreshed {age / 60:.0f} min ago"
        return None

    def acquire(self) -> "WorkDirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read_owner()
                reason = self._stale_reason(owner)
                if reason is None:
                    raise WorkDirBusyError(
                        f"work dir {self.path.parent} is in use by {owner.get('what', 'another run')} "
                        f"(pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started "
                        f"{owner.get('started', '?')}). Wait for it to finish, choose another work dir, "
                        f"or, if that run is dead, delete {self.path}"
                    ) from None
                logger.warning("taking over the stale lock %s (%s): %s", self.path, reason, owner)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self._owner_text())
            self.held = True
            break
        else:
            raise WorkDirBusyError(f"could not take the lock {self.path}: other runs keep taking it")
        if self.heartbeat_s > 0:
            self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.held:
            # only our own lock: a take-over by another run after we were declared stale is theirs
            owner = self._read_owner()
            if (owner.get("pid"), owner.get("host")) == (os.getpid(), socket.gethostname()):
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
            self.held = False

    def __enter__(self) -> "WorkDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
