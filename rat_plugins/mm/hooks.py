"""mmengine hooks that keep a run's files whole: checkpoints replaced only by complete successors, a
checkpoint and a clean exit on SIGTERM / SIGINT, and test-time checkpoints that must fit the model.

``tools/train.py`` swaps ``CheckpointHook`` for :class:`SafeCheckpointHook` and adds
:class:`GracefulStopHook`; ``tools/test.py`` adds :class:`CheckpointFitHook`. Configs run by
OpenMMLab's own tools can name them too (``custom_hooks=[dict(type='GracefulStopHook')]``).
"""

import errno
import os.path as osp
from pathlib import Path
from typing import Optional

import torch
from mmengine.dist import all_reduce, barrier, get_world_size, is_main_process
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop

from ..engine.checkpoints import checkpoint_problem
from ..engine.signals import GracefulStop
from ..utils.atomic import DiskFullError, atomic_write_text
from ..utils.config_keys import ConfigError
from .checkpoint import describe_mismatches, state_dict_mismatches
from .loops import ReproducibleEpochBasedTrainLoop

__all__ = ["SafeCheckpointHook", "GracefulStopHook", "CheckpointFitHook", "TrainingStopped"]


class TrainingStopped(SystemExit):
    """Raised by :class:`GracefulStopHook` to end an epoch-based run mid-epoch after its checkpoint.

    A ``SystemExit`` with status 0, so OpenMMLab's own tools exit cleanly too; ``tools/train.py``
    catches it to close the run's logs first.
    """

    def __init__(self, signal_name: str, checkpoint: Optional[str]):
        super().__init__(0)
        self.signal_name = signal_name
        self.checkpoint = checkpoint


class _DeferredRemoval:
    """A file backend whose ``remove`` / ``rmtree`` wait until :meth:`flush`.

    ``CheckpointHook`` deletes the oldest checkpoint (``max_keep_ckpts``) and the previous best one
    before it writes their successor; a crash or a full disk in that write would leave neither.
    """

    def __init__(self, backend):
        self._backend = backend
        self._pending = []

    def remove(self, path) -> None:
        self._pending.append((self._backend.remove, path))

    def rmtree(self, path) -> None:
        self._pending.append((self._backend.rmtree, path))

    def flush(self, keep=()) -> None:
        pending, self._pending = self._pending, []
        for remove, path in pending:
            if path not in keep and (self._backend.isfile(path) or self._backend.isdir(path)):
                remove(path)

    def __getattr__(self, name):
        return getattr(self._backend, name)


@HOOKS.register_module()
class SafeCheckpointHook(CheckpointHook):
    """``CheckpointHook`` (all its arguments) whose files are never half-written or lost before their successor.

    - Local checkpoints go through :class:`~rat_plugins.mm.checkpoint.AtomicLocalBackend` (temporary file
      + rename) unless ``backend_args`` names another backend. Of the official extension points this
      is the narrowest: the hook already passes ``backend_args`` to every save, so neither the
      Runner nor mmengine's save function changes.
    - Old and previous-best checkpoints are deleted only after the new checkpoint is complete.
    - A full disk is a ``DiskFullError`` naming the checkpoint; the earlier checkpoints stay as they were.
    """

    def before_train(self, runner) -> None:
        out_dir = self.out_dir if self.out_dir is not None else runner.work_dir
        if self.backend_args is None and self.file_client_args is None and "://" not in str(out_dir):
            self.backend_args = dict(backend="local_atomic")
        super().before_train(runner)  # may prune beyond max_keep_ckpts: those have newer successors
        self.file_backend = _DeferredRemoval(self.file_backend)
        if is_main_process() and self.backend_args == dict(backend="local_atomic"):
            self._remove_stale_temporaries(runner, self.out_dir)

    @staticmethod
    def _remove_stale_temporaries(runner, folder) -> None:
        """Temporary files of saves a kill interrupted (``.iter_4.pth.<random>.tmp.pth``); tools/train.py
        holds the work-dir lock, so no other run is writing them."""
        stale = [*Path(folder).glob(".*.pth.*.tmp.pth"), *Path(runner.work_dir).glob(".last_checkpoint.*.tmp")]
        for path in stale:
            runner.logger.warning(f"removing {path}: the unfinished save of an interrupted run")
            path.unlink(missing_ok=True)

    def _kept_paths(self):
        best = [getattr(self, "best_ckpt_path", None), *getattr(self, "best_ckpt_path_dict", {}).values()]
        return {p for p in (self.last_ckpt, *best) if p}

    def _save_checkpoint_with_step(self, runner, step, meta):
        try:
            super()._save_checkpoint_with_step(runner, step, meta)
        except DiskFullError:
            raise
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            # a plain write: the checkpoint itself (a user-chosen backend) or mmengine's last_checkpoint pointer
            written = osp.join(self.out_dir, self.filename_tmpl.format(step))
            if checkpoint_problem(written) is None:
                written = osp.join(runner.work_dir, "last_checkpoint")
            raise DiskFullError(
                errno.ENOSPC,
                f"disk full while writing {written} (folder {osp.dirname(written)}); free space there, "
                "the checkpoints saved before are unchanged",
            ) from e
        self.file_backend.flush(keep=self._kept_paths())

    def _save_best_checkpoint(self, runner, metrics) -> None:
        super()._save_best_checkpoint(runner, metrics)
        self.file_backend.flush(keep=self._kept_paths())


def _checkpoint_hook(runner) -> Optional[CheckpointHook]:
    return next((h for h in runner.hooks if isinstance(h, CheckpointHook)), None)


@HOOKS.register_module()
class GracefulStopHook(Hook):
    """On SIGTERM / SIGINT (and ``$RAT_STOP_SIGNALS``): a checkpoint at the next iteration boundary, then stop.

    The signal only sets a flag (:class:`~rat_plugins.engine.signals.GracefulStop`); after the
    iteration the ranks agree (all-reduce of the flag, so none waits for the others in a collective),
    the checkpoint hook saves through its own naming and ``max_keep_ckpts``, and:

    - an ``IterBasedTrainLoop`` stops through its ``stop_training`` flag and ends as a finished run;
    - an epoch-based loop checks that flag only between epochs: after the last batch of an epoch the
      run stops at the epoch's end (a complete ``epoch_N.pth``); mid-epoch the checkpoint records the
      epoch as not done (``meta.epoch`` = epochs completed, ``meta.iter`` = iterations done) and
      :class:`TrainingStopped` (exit status 0) ends the run. ``--resume`` continues that epoch after
      its last trained batch under ``tools/train.py``
      (:class:`~rat_plugins.mm.loops.ReproducibleEpochBasedTrainLoop`); mmengine's own loop repeats the
      epoch from its start.

    A second SIGINT stops at once, without a checkpoint.
    """

    priority = "LOWEST"  # after CheckpointHook (VERY_LOW): a periodic save of this iteration is not repeated

    def __init__(self):
        self._signals: Optional[GracefulStop] = None
        self._stop_after_epoch: Optional[str] = None
        self.stopped_by: Optional[str] = None  # the signal that ended training early (tools/train.py requeues)

    def before_train(self, runner) -> None:
        self._signals = GracefulStop().install()

    def after_run(self, runner) -> None:
        if self._signals is not None:
            self._signals.restore()
            self._signals = None

    def _stop_requested(self) -> Optional[str]:
        """The signal's name when any rank received one, else None (the same answer on every rank)."""
        local = self._signals.requested if self._signals is not None else None
        if get_world_size() <= 1:
            return local
        flag = torch.tensor(int(local is not None))
        all_reduce(flag, op="max")
        return (local or "a stop signal (on another rank)") if flag.item() else None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        signal_name = self._stop_requested()
        if signal_name is None:
            return
        loop, hook = runner.train_loop, _checkpoint_hook(runner)
        done = dict(epoch=runner.epoch, iter=runner.iter + 1)  # in an epoch loop: epoch not yet complete
        self.stopped_by = signal_name
        if isinstance(loop, IterBasedTrainLoop):
            path = self._save(runner, hook, runner.iter + 1, done)
            runner.logger.warning(f"{signal_name}: stopping after iteration {runner.iter + 1}; checkpoint {path}")
            loop.stop_training = True
            return
        by_epoch = hook is None or hook.by_epoch
        if by_epoch and batch_idx + 1 >= len(loop.dataloader):
            self._stop_after_epoch = signal_name  # the epoch is complete: saved as such in after_train_epoch
            return
        path = self._save(runner, hook, runner.epoch + 1 if by_epoch else runner.iter + 1, done)
        epoch = runner.epoch + 1
        if isinstance(loop, ReproducibleEpochBasedTrainLoop):
            resume = f"continues epoch {epoch} after that iteration"
        else:  # mmengine's own loop
            resume = f"repeats epoch {epoch} from its start"
        runner.logger.warning(
            f"{signal_name}: stopping in epoch {epoch} after iteration {runner.iter + 1}; checkpoint {path} "
            f"(--resume {resume})"
        )
        if get_world_size() > 1:
            barrier()  # nobody leaves before rank 0 has written the checkpoint
        raise TrainingStopped(signal_name, path)

    def after_train_epoch(self, runner) -> None:
        if self._stop_after_epoch is None:
            return
        signal_name, self._stop_after_epoch = self._stop_after_epoch, None
        path = self._save(runner, _checkpoint_hook(runner), runner.epoch + 1, None)
        runner.logger.warning(f"{signal_name}: stopping after epoch {runner.epoch + 1}; checkpoint {path}")
        runner.train_loop.stop_training = True

    @staticmethod
    def _save(runner, hook, step: int, meta: Optional[dict]) -> str:
        """Save through the checkpoint hook (its names, folder, max_keep_ckpts, last_checkpoint) unless
        it has just saved this step; ``meta`` None: a completed epoch, as CheckpointHook records it."""
        if hook is None:  # a config without a CheckpointHook: the work dir, mmengine's names
            name = f"iter_{step}.pth" if isinstance(runner.train_loop, IterBasedTrainLoop) else f"epoch_{step}.pth"
            local = dict(backend="local_atomic")
            runner.save_checkpoint(runner.work_dir, name, meta=meta, by_epoch=meta is None, backend_args=local)
            path = osp.join(runner.work_dir, name)
            if is_main_process():
                atomic_write_text(osp.join(runner.work_dir, "last_checkpoint"), path)
            return path
        path = hook.file_backend.join_path(hook.out_dir, hook.filename_tmpl.format(step))
        if hook.last_ckpt == path:
            return path
        if meta is None:
            hook._save_checkpoint(runner)
        else:
            hook._save_checkpoint_with_step(runner, step, meta)
        return path


@HOOKS.register_module()
class CheckpointFitHook(Hook):
    """Refuse (``ConfigError``) a loaded checkpoint that does not fit the model exactly.

    mmengine loads non-strictly: a checkpoint of another model size loads what fits, logs a
    warning, and the test scores a partly random model. ``tools/test.py`` adds this hook; training's
    ``load_from`` of pretrained weights keeps mmengine's behaviour.
    """

    priority = "VERY_HIGH"

    def after_load_checkpoint(self, runner, checkpoint) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
        # the prefix mmengine strips by default (revise_keys), so a DDP-saved checkpoint fits
        state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
        problems = describe_mismatches(*state_dict_mismatches(model.state_dict(), state))
        if problems:
            source = runner.cfg.get("load_from") or "the checkpoint"
            config = runner.cfg.filename or "the config"
            raise ConfigError(
                f"checkpoint {source} does not fit the model of {config}: {problems}. It was trained with "
                "another model (size) or config: evaluate it with the config it was trained with (its meta.cfg), "
                "or pass a checkpoint of this model"
            )
