"""MLflow for mmseg / mmdet runs: a vis backend on :class:`rat_plugins.tracking.MlflowRun`.

mmengine's own ``MLflowVisBackend`` defaults to the plain file store (refused by MLflow 3), fails
in ``close()`` when no config was added and starts a new run on every resume; this backend shares
the project's run handling with detectron2 instead (the sqlite store beside the work dir, the run
id kept in the work dir, failures that never stop training). ``tools/train.py`` adds it to every
config's visualizer; configs run by OpenMMLab's own tools can list it:
``vis_backends=[dict(type='LocalVisBackend'), dict(type='ProjectMLflowVisBackend')]``.
"""

from pathlib import Path
from typing import Optional

from mmengine.registry import VISBACKENDS
from mmengine.visualization.vis_backend import BaseVisBackend

from ..engine.run_record import flatten_config
from ..tracking import MlflowRun, experiment_for_config

__all__ = ["ProjectMLflowVisBackend"]


@VISBACKENDS.register_module()
class ProjectMLflowVisBackend(BaseVisBackend):
    """Params (the flattened config), tags, and every scalar mmengine logs, into the run's MLflow run.

    Args:
        save_dir: the run's log folder (``<work_dir>/<timestamp>``, given by the visualizer).
        experiment: the experiment's name (default: the config's project folder, e.g. ``SETR``).
        run_name: the run's name (default: the work dir's name).
        tracking_uri: a store or server (default: ``$MLFLOW_TRACKING_URI``, else
            ``sqlite:///<work dir's parent>/mlflow.db``).
    """

    def __init__(
        self,
        save_dir: str,
        experiment: Optional[str] = None,
        run_name: Optional[str] = None,
        tracking_uri: Optional[str] = None,
    ):
        super().__init__(save_dir)
        self._experiment_name, self._run_name, self._uri = experiment, run_name, tracking_uri
        self._run: Optional[MlflowRun] = None

    @property
    def experiment(self) -> Optional[MlflowRun]:
        return self._run

    def _init_env(self, cfg=None) -> None:
        work_dir = Path(cfg.work_dir) if cfg is not None and cfg.get("work_dir") else Path(self._save_dir).parent
        experiment = self._experiment_name or (experiment_for_config(cfg.filename) if cfg and cfg.filename else "mm")
        self._run = MlflowRun(work_dir, experiment=experiment, run_name=self._run_name, uri=self._uri)
        self._run.start(flatten_config(cfg) if cfg is not None else {})
        self._env_initialized = True

    def add_config(self, config, **kwargs) -> None:
        if self._run is None:
            self._init_env(config)

    def add_scalar(self, name, value, step=0, **kwargs) -> None:
        self.add_scalars({name: value}, step)

    def add_scalars(self, scalar_dict, step=0, file_path=None, **kwargs) -> None:
        if self._run is None:
            self._init_env()
        self._run.log_metrics(scalar_dict, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish("FINISHED")
