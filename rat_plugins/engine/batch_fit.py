"""Fit a run's batch into memory: the largest micro-batch that fits, gradients accumulated up to the batch.

The config's batch stays the effective batch (and so the LR schedule): only how many images one
forward pass takes changes. :func:`fit_micro_batch` probes real training steps, largest candidate
first, bisecting over the divisors of the per-process batch (so the accumulation is a whole number):

- CUDA: a step that raises ``torch.OutOfMemoryError`` does not fit; one that runs does when its
  peak (``max_memory_allocated``) stays within the device's memory times the safety margin;
- CPU: there is no out-of-memory error before the kernel's OOM killer, so each step is measured
  against a RAM budget instead (``--memory-budget-gb``, default 60 % of the available memory): the
  parameters with their gradients and optimizer state, plus the bytes autograd saves for backward
  at that micro-batch (what grows with it).

The plan (micro-batch, accumulation, what was measured) is written to the work dir and reused by a
resumed or requeued run with the same config, device and world size.
"""

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..utils.atomic import atomic_write_json
from ..utils.config_keys import ConfigError

__all__ = [
    "BatchPlan",
    "fit_micro_batch",
    "cpu_budget_mb",
    "measure_cpu_step",
    "measure_cuda_step",
    "optimizer_state_copies",
    "probe_micro_batch",
    "load_plan",
    "save_plan",
    "PLAN_FILE",
]

logger = logging.getLogger(__name__)
PLAN_FILE = "batch_plan.json"
MB = 2**20


@dataclass
class BatchPlan:
    """What :func:`fit_micro_batch` chose: ``micro_batch`` x ``accumulation`` = the per-process batch."""

    micro_batch: int
    accumulation: int
    per_process_batch: int
    device: str
    budget_mb: float
    peak_mb: Dict[int, Optional[float]] = field(default_factory=dict)  # micro-batch -> measured (None: OOM)
    key: str = ""

    def describe(self) -> str:
        measured = ", ".join(
            f"{m}: {'out of memory' if p is None else f'{p:.0f} MB'}" for m, p in sorted(self.peak_mb.items())
        )
        return (
            f"micro-batch {self.micro_batch} x {self.accumulation} accumulation steps = {self.per_process_batch} "
            f"images per process per step on {self.device} (budget {self.budget_mb:.0f} MB; measured peaks: {measured})"
        )


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def fit_micro_batch(
    try_step: Callable[[int], float], per_process_batch: int, budget_mb: float, device: str = "cpu"
) -> BatchPlan:
    """The largest divisor ``m`` of ``per_process_batch`` whose step fits.

    ``try_step(m)`` runs one training step at micro-batch ``m`` and returns its peak memory in MB,
    or raises ``torch.OutOfMemoryError``. A ConfigError when not even one image fits.
    """
    if per_process_batch < 1:
        raise ConfigError(f"the batch per process must be at least 1, got {per_process_batch}")
    candidates = _divisors(per_process_batch)
    peaks: Dict[int, Optional[float]] = {}

    def fits(m: int) -> bool:
        try:
            peak = float(try_step(m))
        except torch.OutOfMemoryError:
            peaks[m] = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return False
        peaks[m] = peak
        return peak <= budget_mb

    best = None
    if fits(candidates[-1]):
        best = candidates[-1]
    else:  # bisect over the divisors below the failed one: a fitting step at index lo, none at hi
        lo, hi = -1, len(candidates) - 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(candidates[mid]):
                lo = mid
            else:
                hi = mid
        best = candidates[lo] if lo >= 0 else None
    if best is None:
        raise ConfigError(
            f"not even a micro-batch of 1 fits in {budget_mb:.0f} MB on {device} (measured: "
            f"{peaks.get(1) or 'out of memory'}); use a smaller input size or model, activation checkpointing "
            "(--activation-checkpointing), mixed precision, or a larger --memory-budget-gb"
        )
    return BatchPlan(best, per_process_batch // best, per_process_batch, device, budget_mb, peaks)


def cpu_budget_mb(budget_gb: Optional[float] = None, fraction: float = 0.6) -> float:
    """``budget_gb`` in MB, else ``fraction`` of the memory available now (``MemAvailable``)."""
    if budget_gb is not None:
        if not budget_gb > 0:
            raise ConfigError(f"--memory-budget-gb must be positive, got {budget_gb}")
        return budget_gb * 1024
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024 * fraction
    except OSError:
        pass
    return 8 * 1024 * fraction  # no /proc: assume a small machine


def _saved_bytes_counter():
    """A saved-tensors hook pair counting each storage once (what autograd keeps for backward)."""
    seen, total = set(), [0]

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), total


def _state_bytes(model, optimizer_state_per_param: int) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + trainable * (1 + optimizer_state_per_param)  # + gradients + optimizer state


def measure_cpu_step(model, loss_of_batch: Callable[[], torch.Tensor], optimizer_state_per_param: int = 2) -> float:
    """One forward + backward on CPU: parameters, gradients and optimizer state (``optimizer_state_per_param``
    copies: AdamW 2, SGD with momentum 1) plus the activations saved for backward, in MB."""
    hooks, saved = _saved_bytes_counter()
    with hooks:
        loss = loss_of_batch()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return (_state_bytes(model, optimizer_state_per_param) + saved[0]) / MB


def measure_cuda_step(loss_of_batch: Callable[[], torch.Tensor], step: Callable[[], None]) -> float:
    """One training step on CUDA (forward, backward, ``step()``: the optimizer); its peak allocated MB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    loss = loss_of_batch()
    loss.backward()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / MB


def optimizer_state_copies(optimizer=None, type_name: Optional[str] = None) -> int:
    """State tensors an optimizer keeps per parameter (an optimizer, or its config's type name):
    Adam(W) 2, RMSprop 1 plus 1 with momentum, SGD 1 with momentum, else 0."""
    name = type(optimizer).__name__ if optimizer is not None else str(type_name or "AdamW")
    if name.startswith("Adam"):
        return 2
    momentum = optimizer is None or any(group.get("momentum", 0) for group in optimizer.param_groups)
    return (1 if name == "RMSprop" else 0) + int(bool(momentum))


def probe_micro_batch(
    model,
    loss_of: Callable[[int], torch.Tensor],
    per_process: int,
    device: str,
    budget_gb: Optional[float] = None,
    optimizer=None,
    state_copies: int = 2,
) -> BatchPlan:
    """The largest micro-batch whose training step fits, found with real steps of ``model``; the model
    (weights, batch statistics, gradients, train mode) and ``optimizer`` (state) are left as they were.

    ``loss_of(m)``: the training loss of the first ``m`` samples of one real batch. On CUDA each step
    runs (with ``optimizer.step`` when given, else its ``state_copies`` of the trainable parameters
    are added) against 90 % of the device; on CPU the step's bytes (:func:`measure_cpu_step`) against
    :func:`cpu_budget_mb`.
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train()
    if device.startswith("cuda"):
        budget = torch.cuda.get_device_properties(torch.device(device)).total_memory / MB * 0.9
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        state_mb = 0.0 if optimizer is not None else trainable * state_copies / MB  # the state to come

        def try_step(m):
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            peak = measure_cuda_step(lambda: loss_of(m), optimizer.step if optimizer is not None else lambda: None)
            model.zero_grad(set_to_none=True)
            return peak + state_mb
    else:
        budget = cpu_budget_mb(budget_gb)

        def try_step(m):
            return measure_cpu_step(model, lambda: loss_of(m), state_copies)

    try:
        return fit_micro_batch(try_step, per_process, budget, device)
    finally:  # the probe's steps leave nothing behind
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            optimizer.state.clear()
        model.train(was_training)


def plan_key(config: dict, device: str, world_size: int) -> str:
    import hashlib

    text = json.dumps(dict(config=config, device=device, world=world_size), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_plan(work_dir, key: str) -> Optional[BatchPlan]:
    """The plan saved in ``work_dir`` for ``key`` (same config, device, world size), else None."""
    try:
        data = json.loads((Path(work_dir) / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if data.get("key") != key:
        return None
    data["peak_mb"] = {int(k): v for k, v in data.get("peak_mb", {}).items()}
    return BatchPlan(**data)


def save_plan(work_dir, plan: BatchPlan) -> Path:
    path = Path(work_dir) / PLAN_FILE
    os.makedirs(path.parent, exist_ok=True)
    atomic_write_json(path, asdict(plan), indent=1)
    return path
