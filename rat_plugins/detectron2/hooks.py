"""Training hooks that end a detectron2 run without losing it: on a stop signal, on a full disk.

detectron2's loop logs any ``Exception`` out of a hook as a crash, with its traceback, before
re-raising it. The two endings here are ``BaseException`` subclasses, so they leave the loop
quietly (its ``after_train`` hooks still run) and the training function decides what to print.
"""

import json
import math
import re
import signal
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from detectron2.engine import hooks
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..engine.signals import GracefulStop
from ..utils.atomic import DiskFullError, atomic_write_json
from ..utils.config_keys import ConfigError

__all__ = [
    "TrainingStopped",
    "TrainingAborted",
    "TrainingEndedEarly",
    "SafePeriodicCheckpointer",
    "StopOnSignal",
    "ClipGradNorm",
    "BestModelCheckpointer",
    "EarlyStopping",
    "read_best_record",
]

BEST_RECORD = "model_best.json"  # beside model_best.pth: the score, iteration and epoch it was saved at


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


class TrainingEndedEarly(BaseException):
    """Early stopping: the validation metric has not improved for ``patience`` evaluations."""

    def __init__(self, iteration: int, metric: str, best: float, best_iteration: int, patience: int):
        super().__init__(
            f"{metric} has not improved on {best:.4g} (iteration {best_iteration}) for {patience} evaluations"
        )
        self.iteration, self.metric, self.best, self.best_iteration = iteration, metric, best, best_iteration


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


def read_best_record(output_dir) -> Optional[dict]:
    """``model_best.json`` of a run (``metric``, ``value``, ``iteration``, ``epoch``), or None."""
    path = Path(output_dir) / BEST_RECORD
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


class BestModelCheckpointer(hooks.BestCheckpointer):
    """detectron2's ``BestCheckpointer`` (``model_best.pth`` whenever ``val_metric`` improves) that
    survives a restart: the best score, its iteration and epoch go to ``model_best.json`` after each
    save, and a resumed run starts from that record instead of letting its first evaluation replace a
    better model. ``checkpointer`` should not move ``last_checkpoint`` (``RunCheckpointer(tag_last=False)``):
    a resume continues from the newest periodic checkpoint, never from the best one."""

    def __init__(self, eval_period: int, checkpointer, val_metric: str, iters_per_epoch: Optional[int] = None):
        super().__init__(eval_period, checkpointer, val_metric, mode="max", file_prefix="model_best")
        self._iters_per_epoch = iters_per_epoch
        self._improved = False

    def before_train(self):
        from ..engine.checkpoints import checkpoint_problem

        record = read_best_record(self._checkpointer.save_dir)
        path = Path(self._checkpointer.save_dir) / "model_best.pth"
        # only a record of the trajectory this run continues, whose model is intact
        adopt = record is not None and record.get("metric") == self._val_metric
        adopt = adopt and int(record["iteration"]) < self.trainer.start_iter and checkpoint_problem(path) is None
        if adopt:
            self.best_metric, self.best_iter = float(record["value"]), int(record["iteration"])
            self._logger.info(
                "Best %s so far: %.5f at iteration %d (model_best.pth)",
                self._val_metric,
                self.best_metric,
                self.best_iter,
            )

    def _update_best(self, val, iteration):
        self._improved = super()._update_best(val, iteration)
        return self._improved

    def _write_record(self) -> None:
        if not self._improved:
            return
        self._improved = False
        epoch = (self.best_iter + 1) / self._iters_per_epoch if self._iters_per_epoch else None
        record = dict(metric=self._val_metric, value=self.best_metric, iteration=self.best_iter)
        record["epoch"] = round(epoch, 2) if epoch is not None else None
        atomic_write_json(Path(self._checkpointer.save_dir) / BEST_RECORD, record, indent=1)

    def after_step(self):
        super().after_step()
        self._write_record()

    def after_train(self):
        super().after_train()
        self._write_record()


class EarlyStopping(hooks.HookBase):
    """End training when ``metric`` (validation, higher is better) has not improved by more than
    ``min_delta`` for ``patience`` evaluations in a row. Register it after the evaluation and the best
    checkpointer. The main process decides and every process follows (under DDP only the main one
    has the scores); the evaluations so far are kept in ``early_stopping.json``, so a resumed run
    counts the ones before its start and not those it repeats."""

    RECORD = "early_stopping.json"

    def __init__(self, eval_period: int, metric: str, patience: int, output_dir: str, min_delta: float = 0.0):
        if not (isinstance(patience, int) and patience >= 1):
            raise ConfigError(f"train.early_stopping.patience must be a whole number >= 1, got {patience!r}")
        self.period, self.metric, self.patience, self.min_delta = eval_period, metric, patience, float(min_delta)
        self.path = Path(output_dir) / self.RECORD
        self.scores = []  # (iteration, value) of each evaluation

    def before_train(self):
        try:
            earlier = json.loads(self.path.read_text())["scores"]
        except (FileNotFoundError, ValueError, KeyError):
            earlier = []
        self.scores = [(int(i), float(v)) for i, v in earlier if int(i) < self.trainer.start_iter]

    def _verdict(self) -> Optional[tuple]:
        """(best, its iteration) when training should stop now, else None (main process)."""
        found = self.trainer.storage.latest().get(self.metric)
        if found is None:
            return None
        value, iteration = float(found[0]), int(found[1])
        if iteration != self.trainer.iter or math.isnan(value):
            return None
        self.scores.append((iteration, value))
        atomic_write_json(self.path, dict(metric=self.metric, scores=self.scores), indent=1)
        best_i, best = -1, -math.inf
        for i, (_, v) in enumerate(self.scores):
            if v > best + self.min_delta:
                best_i, best = i, v
        if len(self.scores) - 1 - best_i >= self.patience:
            return best, self.scores[best_i][0]
        return None

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if not (self.period > 0 and next_iter % self.period == 0 and next_iter < self.trainer.max_iter):
            return
        verdict = self._verdict() if comm.is_main_process() else None
        if comm.get_world_size() > 1:
            verdict = comm.all_gather(verdict)[0]
        if verdict is not None:
            raise TrainingEndedEarly(self.trainer.iter, self.metric, verdict[0], verdict[1], self.patience)
