"""detectron2 checkpoints that survive crashes and refuse what does not fit the model.

:class:`RunCheckpointer` is detectron2's ``DetectionCheckpointer`` with three changes:

- saving writes a temporary file renamed into place when complete (the checkpoint, then the
  ``last_checkpoint`` pointer), so a crash, a kill or a full disk leaves the previous ones intact;
  a full disk is a ``DiskFullError`` naming the file;
- ``resume_or_load(..., resume=True)`` verifies the file ``last_checkpoint`` points at and falls
  back to the newest intact ``model_*.pth`` (a warning names each skipped file and why); with none,
  training starts from ``train.init_checkpoint``, with a warning when broken ones were skipped;
- :meth:`RunCheckpointer.load_strict` (evaluation) refuses a checkpoint whose weights do not fit
  the model (another model size: shape mismatches, missing or unexpected keys) instead of
  scoring a partly random model. Training's ``train.init_checkpoint`` (a pretrained backbone)
  stays non-strict, as in detectron2.
"""

import logging
import os
from pathlib import Path
from typing import List, Optional

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from ..engine.checkpoints import atomic_torch_save, checkpoint_problem, choose_resume_checkpoint
from ..utils.atomic import atomic_write_text
from ..utils.config_keys import ConfigError

__all__ = ["RunCheckpointer", "CheckpointMismatchError", "require_checkpoint_file", "LAST_CHECKPOINT"]

logger = logging.getLogger(__name__)
LAST_CHECKPOINT = "last_checkpoint"  # detectron2's pointer file in the output dir
# torch files whose integrity checkpoint_problem can judge (detectron2 also reads .pkl model-zoo files)
_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt")


class CheckpointMismatchError(ConfigError):
    """A checkpoint whose weights do not fit the model it is loaded into."""


def require_checkpoint_file(path: str, what: str) -> None:
    """ConfigError unless the local file ``path`` exists and (a torch file) is intact; URLs pass."""
    path = str(path)
    if "://" in path:
        return
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} does not exist; give the path of a checkpoint file (model_*.pth)")
    if path.endswith(_TORCH_SUFFIXES):
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ConfigError(f"{what} {path} cannot be loaded: {problem}")


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


class RunCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves, verified resume and strict evaluation loading.

    Args:
        model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
        file_prefix: the periodic checkpoints' prefix (``model`` -> ``model_0000499.pth``).
        tag_last: whether a save moves ``last_checkpoint`` to it (the file ``--resume`` continues from).
    """

    def __init__(self, model, save_dir="", *, file_prefix: str = "model", tag_last: bool = True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.file_prefix = file_prefix
        self.tag_last = tag_last  # False: saves leave last_checkpoint alone (the best model's)
        self.last_saved_iteration: Optional[int] = None
        self._strict_path: Optional[str] = None  # set while load_strict runs
        self._skipped = False  # the last resume choice skipped damaged files
        self.resumed_from: Optional[str] = None  # the checkpoint resume_or_load continued from

    # -- saving ------------------------------------------------------------------------------
    def save(self, name: str, **kwargs) -> None:
        """As ``Checkpointer.save``, through a temporary file: the previous checkpoint is never half-overwritten."""
        self.last_saved_iteration = kwargs.get("iteration")
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_torch_save(data, path)
        if self.tag_last:
            self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, LAST_CHECKPOINT), last_filename_basename)

    # -- resuming ----------------------------------------------------------------------------
    def resume_or_load(self, path: str, *, resume: bool = True):
        self.resumed_from = self.checkpoint_to_resume(path) if resume else None
        if self.resumed_from is not None:
            return self.load(self.resumed_from)
        return self.load(path, checkpointables=[])

    def checkpoint_to_resume(self, init_checkpoint: str = "") -> Optional[str]:
        """The intact checkpoint to resume from (the main process chooses, every process gets its choice)."""
        choice = self._choose() if comm.is_main_process() else None
        if comm.get_world_size() > 1:
            choice = comm.all_gather(choice)[0]
        if choice is None and comm.is_main_process():
            start = (
                f"train.init_checkpoint ({init_checkpoint})" if init_checkpoint else "the model's own initialisation"
            )
            logger.log(
                logging.WARNING if self._skipped else logging.INFO,
                "--resume: no intact checkpoint in %s%s; training starts at iteration 0 from %s",
                self.save_dir,
                " (every one is damaged, see above)" if self._skipped else "",
                start,
            )
        return choice

    def _choose(self) -> Optional[str]:
        self._remove_partial_saves()
        pointed, warnings = self._pointed_checkpoint()
        chosen, more = choose_resume_checkpoint(pointed, self.save_dir, [f"{self.file_prefix}_*.pth"])
        warnings += more
        self._skipped = bool(warnings)
        for warning in warnings:
            logger.warning("--resume: %s", warning)
        if chosen is not None:
            logger.info("--resume: continuing from %s", chosen)
        return None if chosen is None else str(chosen)

    def _pointed_checkpoint(self):
        pointer = Path(self.save_dir) / LAST_CHECKPOINT
        try:
            name = pointer.read_text().strip()
        except FileNotFoundError:
            return None, []
        except OSError as e:
            return None, [f"cannot read {pointer} ({e}); looking for the newest intact checkpoint"]
        if not name:
            return None, [f"{pointer} is empty; looking for the newest intact checkpoint"]
        return Path(self.save_dir) / name, []

    def _remove_partial_saves(self) -> List[Path]:
        """Temporary files of saves a kill interrupted (``.model_0000499.pth.<random>.tmp.pth``): each is as
        large as a checkpoint and would otherwise stay forever. The work-dir lock says no other run writes here."""
        folder = Path(self.save_dir)
        partial = sorted(folder.glob(f".{self.file_prefix}_*.pth.*.tmp.pth")) + sorted(
            folder.glob(f".{LAST_CHECKPOINT}.*.tmp")
        )
        for path in partial:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            logger.warning("removed %s (%d bytes), left by a save that was interrupted", path, size)
        return partial

    # -- loading -----------------------------------------------------------------------------
    def load(self, path, *args, **kwargs):
        if path:
            require_checkpoint_file(path, "the checkpoint" if self.resumed_from else "train.init_checkpoint")
        return super().load(path, *args, **kwargs)

    def load_strict(self, path: str):
        """Load only the model's weights from ``path``, refusing (``CheckpointMismatchError``) a checkpoint
        with weights of another shape, missing or unexpected keys."""
        self._strict_path = str(path)
        try:
            return self.load(path, checkpointables=[])
        finally:
            self._strict_path = None

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if self._strict_path:
            self._refuse_mismatch(incompatible)
        return incompatible

    def _refuse_mismatch(self, incompatible) -> None:
        shapes, unexpected = incompatible.incorrect_shapes, incompatible.unexpected_keys
        # fvcore drops the mismatched weights before loading, so they come back as missing too
        reshaped = {key for key, _, _ in shapes}
        missing = [key for key in incompatible.missing_keys if key not in reshaped]
        if not (shapes or missing or unexpected):
            return
        first = [
            f"{k}: {_shape(ckpt)} in the checkpoint, {_shape(model)} in the model" for k, ckpt, model in shapes[:3]
        ]
        first += [f"missing {k}" for k in missing[:3]]
        first += [f"unexpected {k}" for k in unexpected[:3]]
        raise CheckpointMismatchError(
            f"the checkpoint {self._strict_path} does not fit the model ({len(shapes)} weights of another "
            f"shape, {len(missing)} missing, {len(unexpected)} unexpected; first: {'; '.join(first)}). "
            "It was trained with another model size or architecture: evaluate it with the config and "
            "overrides it was trained with "
            "(its run's config.yaml)"
        )
