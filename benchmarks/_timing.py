"""Helpers shared by the benchmark scripts (run as files, ``python benchmarks/bench_*.py``, which puts
this folder on ``sys.path``): the median timer, resident memory, the ``--threads`` option."""

import argparse
import os
import statistics
import time

THREADS_HELP = (
    "intra-op threads (default: torch's). On a shared, busy machine 1 thread is often faster: "
    "every parallel op waits for its slowest thread"
)


def median_time(fn, repeats, warmup=1):
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_mb(field="VmRSS"):
    """This process's resident memory in MiB from ``/proc/self/status``: ``VmRSS`` (now) or
    ``VmHWM`` (peak); NaN where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb():
    """This process's peak resident memory in MiB."""
    return rss_mb("VmHWM")


def add_threads_argument(parser: argparse.ArgumentParser, default=None):
    """``--threads N``: torch's intra-op threads (see :func:`set_threads`)."""
    parser.add_argument("--threads", type=int, default=default, help=THREADS_HELP)


def set_threads(threads):
    """``torch.set_num_threads(threads)`` when given; returns the count torch now uses."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def threads_argv(threads):
    """The ``--threads`` option to hand on to a child process (empty when not set)."""
    return ["--threads", str(threads)] if threads else []


def load_note():
    """``load average 1.2 over 16 CPUs`` and whether other processes make the timings noisy."""
    load = os.getloadavg()[0]
    return f"load average {load:.1f} over {os.cpu_count()} CPUs" + (
        ": other processes are running, timings are noisy" if load > 0.5 else ""
    )


class SavedForBackward:
    """Counts the bytes autograd saves for backward, each storage once.

    Use ``with counter.hooks(): loss = model(x)``; ``counter.mb`` is the total so far.
    """

    def __init__(self):
        self.bytes = 0
        self._seen = set()

    def _pack(self, t):
        try:
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):
            key = (id(t), t.numel() * t.element_size())
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += key[1]
        return t

    @staticmethod
    def _unpack(t):
        return t

    def hooks(self):
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def mb(self):
        return self.bytes / 2**20


def run_child(cmd, label):
    """Run a benchmark child process; return the JSON of its last ``RESULT {...}`` line, or None
    (its output printed to stderr) when it failed."""
    import json
    import subprocess
    import sys

    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(f"{label}: failed ({proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(line[-1][len("RESULT ") :])


def print_table(cols, rows):
    """Print ``rows`` (lists of strings) under ``cols`` as an aligned text table."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))
