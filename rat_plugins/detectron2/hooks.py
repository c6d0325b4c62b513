"""Training hooks that end a detectron2 run without losing it: on a stop signal, on a full disk.

detectron2's loop logs any ``Exception`` out of a hook as a crash, with its traceback, before
re-raising it. The two endings here are ``BaseException`` subclasses, so they leave the loop
quietly (its ``after_train`` hooks still run) and the training function decides what to print.
"""

import re
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from detectron2.engine import hooks
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..engine.signals import GracefulStop
from ..utils.atomic import DiskFullError
from ..utils.config_keys import ConfigError

__all__ = ["TrainingStopped", "TrainingAborted", "SafePeriodicCheckpointer", "StopOnSignal", "ClipGradNorm"]


class TrainingStopped(BaseException):
    """Training ended early on a stop signal, after a checkpoint (``checkpoint`` None: none was needed)."""

    def __init__(self, signal_name: str, iteration: int, checkpoint=None):
        super().__init__(f"stopped by {signal_name} after iteration {iteration}")
        self.signal_name = signal_name
        self.iteration = iteration
        self.checkpoint = checkpoint


class TrainingAborted(BaseException):
    """Carries ``error`` (a full disk while checkpointing) out of detectron2's loop without its traceback."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class SafePeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's periodic checkpoints; a full disk ends the run with the message that names the file.

    With ``max_to_keep``, fvcore deletes the oldest checkpoint only after the new one is saved; the
    project's checkpointer (``RunCheckpointer``) renames a save into place only when it is complete,
    so a checkpoint is never removed before its successor exists whole, and a failed save removes
    nothing. A resumed run counts the checkpoints before its first iteration in ``max_to_keep`` (fvcore
    forgets them, and every resume would otherwise leave ``max_to_keep`` more behind).
    """

    def before_train(self):
        super().before_train()
        if self.max_to_keep is None:
            return
        earlier = []
        pattern = re.compile(rf"{re.escape(self.file_prefix)}_(\d+)\.pth")
        for path in Path(self.checkpointer.save_dir).glob(f"{self.file_prefix}_*.pth"):
            found = pattern.fullmatch(path.name)
            if found and int(found.group(1)) < self.trainer.start_iter:
                earlier.append((int(found.group(1)), str(path)))
        self.recent_checkpoints = [path for _, path in sorted(earlier)]

    def after_step(self):
        try:
            super().after_step()
        except DiskFullError as e:
            raise TrainingAborted(e) from e


def _signal_number(name) -> int:
    if not name:
        return 0
    try:
        return int(signal.Signals[name])
    except KeyError:
        return int(name) if str(name).isdigit() else int(signal.SIGTERM)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


class StopOnSignal(hooks.HookBase):
    """At the first iteration boundary after a stop signal: checkpoint (main process), then end training.

    Under DDP every process reduces the flag (one scalar, max over ranks) after every iteration, so
    all stop after the same iteration and none is left waiting in a collective. Register it after
    the LR scheduler, periodic checkpointer and evaluation hooks: the checkpoint then holds the
    state the next iteration would start from, and an evaluation due at this iteration is not skipped.

    Args:
        stop: the process's :class:`GracefulStop` (installed for the run).
        checkpointer: the run's ``RunCheckpointer`` (saves on the main process only).
        file_prefix: the checkpoint's name prefix, as the periodic checkpointer's.
    """

    def __init__(self, stop: GracefulStop, checkpointer, file_prefix: str = "model"):
        self.stop = stop
        self.checkpointer = checkpointer
        self.file_prefix = file_prefix

    def _agreed_signal(self):
        number = _signal_number(self.stop.requested)
        if comm.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([number], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            number = int(flag.item())
        return _signal_name(number) if number else None

    def before_train(self):
        name = self._agreed_signal()
        if name:  # signalled while the model and data were being built: nothing new to save
            raise TrainingStopped(name, self.trainer.start_iter - 1)

    def after_step(self):
        name = self._agreed_signal()
        if not name:
            return
        iteration = self.trainer.iter
        if self.checkpointer.last_saved_iteration != iteration:  # the periodic one may have just saved it
            try:
                self.checkpointer.save(f"{self.file_prefix}_{iteration:07d}", iteration=iteration)
            except DiskFullError as e:
                raise TrainingAborted(e) from e
        raise TrainingStopped(name, iteration, self.checkpointer.get_checkpoint_file())


class ClipGradNorm(hooks.HookBase):
    """Clip the gradients by their total norm before the optimizer step (detectron2's LazyConfig trainers have
    no clipping of their own); the norm before clipping is logged as ``grad_norm``. Under float16 AMP the
    gradients are unscaled first (the grad scaler's step then skips its own unscaling)."""

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        if not max_norm > 0:
            raise ConfigError(f"train.clip_grad_norm must be a positive number, got {max_norm}")
        self.max_norm, self.norm_type = float(max_norm), float(norm_type)

    def after_backward(self) -> None:
        trainer = self.trainer
        scaler = getattr(trainer, "grad_scaler", None)
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(trainer.optimizer)
        params = [p for group in trainer.optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm, norm_type=self.norm_type)
        get_event_storage().put_scalar("grad_norm", float(norm), smoothing_hint=False)
