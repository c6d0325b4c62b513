"""MLflow for detectron2 runs: an ``EventWriter`` beside detectron2's own writers (rank 0).

The run itself (store, run id kept in the work dir, params, tags, failures that never stop
training) is :class:`rat_plugins.tracking.MlflowRun`; this module translates detectron2's event
storage into it.
"""

import os
from typing import Dict, Optional

from detectron2.utils import comm
from detectron2.utils.events import EventWriter, get_event_storage

from ..tracking import MlflowRun, experiment_for_config, tracking_enabled

__all__ = ["MLflowWriter", "start_tracking", "end_tracking"]


class MLflowWriter(EventWriter):
    """Every scalar of the event storage (losses, lr, data time, AP...) at its iteration, once."""

    def __init__(self, run: MlflowRun):
        self.run = run
        self._written: Dict[str, int] = {}  # scalar -> last iteration logged

    def write(self) -> None:
        by_iteration: Dict[int, Dict[str, float]] = {}
        for name, (value, iteration) in get_event_storage().latest().items():
            if iteration > self._written.get(name, -1):
                by_iteration.setdefault(iteration, {})[name] = value
                self._written[name] = iteration
        for iteration in sorted(by_iteration):
            self.run.log_metrics(by_iteration[iteration], step=iteration)


def start_tracking(cfg, config_file: str, flat_config: dict) -> Optional[MlflowRun]:
    """Rank 0: the run's MLflow run (created, or continued after a resume); None when tracking is off."""
    tracking = cfg.train.get("tracking") or {}
    if not comm.is_main_process() or not tracking_enabled(bool(tracking.get("enabled", True))):
        return None
    run = MlflowRun(
        cfg.train.output_dir,
        experiment=tracking.get("experiment") or experiment_for_config(config_file),
        run_name=tracking.get("run_name"),
        uri=tracking.get("uri"),
    )
    return run.start(flat_config, world_size=comm.get_world_size(), device=cfg.train.device)


def end_tracking(run: Optional[MlflowRun], cfg, status: str, final: Optional[dict] = None) -> None:
    """The final metrics and the run's files as artifacts, then the run's end status."""
    if run is None:
        return
    names = ("config.yaml", "run_config.json", "metrics.json", "final_metrics.json", "eval_metrics.json")
    files = [os.path.join(cfg.train.output_dir, name) for name in names]
    run.close(status, final, step=cfg.train.max_iter, files=files)
