"""One MLflow run per training run, shared by both tool families (rank 0 only).

Where runs go: ``$MLFLOW_TRACKING_URI``, else the config's tracking URI, else a sqlite store beside
the run's work dir (``sqlite:///<work_dirs>/mlflow.db``: the runs of a sweep, whose work dirs share
a parent, sit side by side in one store). MLflow 3.x refuses the plain file store, so a
``file:`` / folder URI is refused here with the fix. MLflow's telemetry is off unless the user
turned it on.

The run id is kept in ``<work_dir>/mlflow_run.json``: a resumed (or requeued) run continues the
same MLflow run. Tracking never stops training: the first failure (a server that is down, a locked
store) is one warning, and the run goes on without tracking.
"""

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from ..utils.atomic import atomic_write_json
from ..utils.config_keys import ConfigError

__all__ = [
    "MlflowRun",
    "tracking_uri",
    "RUN_FILE",
    "experiment_for_config",
    "flat_params",
    "flatten_metrics",
    "continue_run",
    "tracking_enabled",
    "log_study_summary",
]

logger = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"
STORE_NAME = "mlflow.db"
# MLflow's limits: param values of 6000 characters, keys of 250; long values are cut with a marker
PARAM_VALUE_MAX = 500
_BATCH = 100  # MLflow's log_batch takes at most 100 params and 1000 metrics per call


def _quiet_defaults() -> None:
    """No telemetry, and a tracking server that is down costs seconds, not minutes of retries."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def tracking_enabled(configured: bool = True) -> bool:
    """``$RAT_TRACKING=0`` turns tracking off for every run (else the config's switch decides)."""
    return configured and os.environ.get("RAT_TRACKING", "1").lower() not in ("0", "off", "false", "no")


def tracking_uri(work_dir, configured: Optional[str] = None) -> str:
    """The store for a run in ``work_dir``: ``$MLFLOW_TRACKING_URI``, ``configured``, or the sqlite store
    in the work dir's parent. A plain file store (refused by MLflow 3) is a ConfigError."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        return "sqlite:///" + str(Path(work_dir).resolve().parent / STORE_NAME)
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(
            f"MLflow tracking URI {uri!r} is a plain file store, which MLflow 3 refuses: use a sqlite store "
            f"(sqlite:///{Path(uri.removeprefix('file:')).resolve()}/mlflow.db) or a server (http://HOST:PORT)"
        )
    return uri


# the studies' names, where a project's folder alone does not say which study a config belongs to
_STUDIES = {
    ("RAT", ""): "RAT ISIC",
    ("RAT", "ablations"): "RAT ISIC",
    ("RAT", "coco"): "RAT COCO",
    ("RVT", ""): "eTraM",
}


def experiment_for_config(config_file) -> str:
    """The experiment's name from where the config sits: ``projects/ViTDet/configs/OFAT/x.py`` -> ``OFAT``,
    ``projects/SETR/configs/x.py`` -> ``SETR``, ``projects/RAT/configs/ablations/x.py`` -> ``RAT ISIC``,
    ``projects/RAT/configs/coco/x.py`` -> ``RAT COCO``, ``projects/RVT/configs/x.py`` -> ``eTraM``."""
    parts = Path(config_file).resolve().parts
    if "configs" in parts:
        i = len(parts) - 1 - parts[::-1].index("configs")
        project = parts[i - 1]
        inside = parts[i + 1 : -1]
        folder = inside[0] if inside and inside[0] != "_base_" else ""
        return _STUDIES.get((project, folder)) or folder or project
    return Path(config_file).stem


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text if len(text) <= PARAM_VALUE_MAX else text[: PARAM_VALUE_MAX - 14] + "...[truncated]"


def flat_params(flat: Mapping[str, Any]) -> Dict[str, str]:
    """A flattened config as MLflow params: values as text (lists as JSON), long ones truncated."""
    return {str(k)[:250]: _param_value(v) for k, v in flat.items()}


def _git_tags(folder: Path) -> Dict[str, str]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)

    try:
        commit = git("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit.stdout.strip(), "git_dirty": str(dirty).lower()}


def _run_tags(world_size: int, device: str) -> Dict[str, str]:
    from ..cluster.environment import detect_environment

    env = detect_environment()
    tags = {"host": socket.gethostname(), "world_size": str(world_size), "device": str(device)}
    tags["launcher"] = env.launcher
    if env.job_id:
        tags["cluster_job_id"] = str(env.job_id)
    tags.update(_git_tags(Path(__file__).resolve().parents[2]))
    return tags


class MlflowRun:
    """The MLflow run of a training run in ``work_dir`` (created, or continued from ``mlflow_run.json``).

    Args:
        work_dir: the run's work dir (holds ``mlflow_run.json``).
        experiment: the experiment's name (OFAT, SETR, ...).
        run_name: the run's name (default: the work dir's name).
        uri: a tracking URI (default: see :func:`tracking_uri`).
    """

    def __init__(
        self,
        work_dir,
        experiment: str,
        run_name: Optional[str] = None,
        uri: Optional[str] = None,
        run_file: str = RUN_FILE,
    ):
        _quiet_defaults()
        self.work_dir = Path(work_dir)
        self.run_file = run_file
        self.experiment = experiment
        self.run_name = run_name or self.work_dir.name
        self.uri = tracking_uri(work_dir, uri)
        self.run_id: Optional[str] = None
        self.resumed = False
        self._client = None
        self._failed = False

    # -- failures: one warning, then silence ------------------------------------------------
    def _guard(self, what: str, fn, *args, **kwargs):
        if self._failed:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # any tracking failure: never the training run's end
            self._failed = True
            logger.warning(
                "MLflow tracking at %s failed while %s (%s: %s); training goes on without tracking",
                self.uri,
                what,
                type(e).__name__,
                str(e).splitlines()[0][:300] if str(e) else "",
            )
            return None

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self._failed

    # -- the run ------------------------------------------------------------------------------
    def start(
        self, params: Optional[Mapping[str, Any]] = None, world_size: int = 1, device: str = "cpu"
    ) -> "MlflowRun":
        """Create the run (params and tags logged), or continue the one ``mlflow_run.json`` names."""
        self._guard("starting the run", self._start, params or {}, world_size, device)
        return self

    def _start(self, params, world_size, device) -> None:
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.uri)
        previous = self._previous_run_id()
        if previous is not None:
            self.run_id, self.resumed = previous, True
            self._client.update_run(previous, status="RUNNING")
            logger.info("MLflow: continuing run %s in %s", previous, self.uri)
            return
        experiment_id = self._experiment_id()
        run = self._client.create_run(experiment_id, run_name=self.run_name, tags=_run_tags(world_size, device))
        self.run_id = run.info.run_id
        atomic_write_json(self.work_dir / self.run_file, dict(tracking_uri=self.uri, run_id=self.run_id), indent=1)
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flat_params(params).items()]
        for i in range(0, len(items), _BATCH):
            self._client.log_batch(self.run_id, params=items[i : i + _BATCH])
        logger.info("MLflow: run %s (experiment %s) in %s", self.run_id, self.experiment, self.uri)

    def _previous_run_id(self) -> Optional[str]:
        try:
            record = json.loads((self.work_dir / self.run_file).read_text())
        except (OSError, ValueError):
            return None
        if record.get("tracking_uri") != self.uri:
            return None  # another store now: a new run there
        try:
            self._client.get_run(record["run_id"])
        except Exception:
            return None  # deleted from the store meanwhile
        return record["run_id"]

    def _experiment_id(self) -> str:
        existing = self._client.get_experiment_by_name(self.experiment)
        if existing is not None:
            return existing.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the store, not in ./mlruns of the cwd
            location = (Path(self.uri[len("sqlite:///") :]).parent / "mlartifacts" / self.experiment).as_uri()
        try:
            return self._client.create_experiment(self.experiment, artifact_location=location)
        except Exception:
            existing = self._client.get_experiment_by_name(self.experiment)  # another run created it meanwhile
            if existing is None:
                raise
            return existing.experiment_id

    def _open(self, record) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        self._client.get_run(record["run_id"])
        self.run_id = record["run_id"]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active or not metrics:
            return
        self._guard("logging metrics", self._log_metrics, metrics, step)

    def _log_metrics(self, metrics, step) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_metric_key(k), float(v), now, int(step)) for k, v in metrics.items() if _is_number(v)]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifacts(self, paths: Iterable, folder: Optional[str] = None) -> None:
        for path in paths:
            if self.active and Path(path).is_file():
                self._guard(f"uploading {path}", self._client.log_artifact, self.run_id, str(path), folder)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            if self.active:
                self._guard(f"tagging {key}", self._client.set_tag, self.run_id, key, str(value))

    def close(
        self,
        status: str,
        final: Optional[Mapping[str, Any]] = None,
        step: int = 0,
        files: Iterable = (),
        folders: Optional[Mapping[str, Iterable]] = None,
    ) -> None:
        """The end of a training run: its final metrics (as ``final/...`` at ``step``), its files as
        artifacts (``folders``: more files under a named artifact folder), then its end status."""
        if final:
            self.log_metrics(flatten_metrics(final, "final"), step=step)
        self.log_artifacts(files)
        for folder, paths in (folders or {}).items():
            self.log_artifacts(paths, folder)
        self.finish(status)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, or KILLED (stopped by a signal: a resume continues it)."""
        if self.active:
            self._guard("ending the run", self._client.set_terminated, self.run_id, status)


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _metric_key(key: str) -> str:
    # MLflow keys: alphanumerics, _ - . space / ; detectron2's "bbox/AP-head" and mmseg's "val/mIoU" fit
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in str(key))[:250]


def flatten_metrics(nested: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """``{"test": {"bbox": {"AP": 1.0}}}`` -> ``{"test/bbox/AP": 1.0}`` (numbers only)."""
    out: Dict[str, float] = {}
    for key, value in (nested or {}).items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, name))
        elif _is_number(value) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def continue_run(work_dir) -> Optional[MlflowRun]:
    """The MLflow run recorded in ``work_dir`` (None without one), for logging after training ended."""
    try:
        record = json.loads((Path(work_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    run = MlflowRun(work_dir, experiment="", uri=record.get("tracking_uri"))
    run._guard("opening the run", run._open, record)
    return run if run.active else None


def log_study_summary(out_dir, experiment: str, uri: str, files: Iterable) -> Optional[str]:
    """A study's tables and plots as the artifacts of its run named ``summary`` (one per store and study,
    its id kept in ``<out_dir>/mlflow_summary_run.json``). Only where the study's runs were tracked: the
    store holds the experiment. Returns the run id (None: nothing logged)."""
    if not tracking_enabled():
        return None
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return None
    _quiet_defaults()
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return None
        earlier = client.search_runs([found.experiment_id], "tags.`rat.summary` = 'true'", max_results=1)
    except Exception as e:  # a store that cannot be read: the study's files are written all the same
        logger.warning("MLflow store %s not read (%s); the study's summary is not logged there", uri, e)
        return None
    run_file = "mlflow_summary_run.json"
    if earlier:  # one summary run per study and store, whichever folder the tables go to
        atomic_write_json(Path(out_dir) / run_file, dict(tracking_uri=uri, run_id=earlier[0].info.run_id), indent=1)
    run = MlflowRun(out_dir, experiment, run_name="summary", uri=uri, run_file=run_file).start()
    run.set_tags({"rat.summary": "true"})
    run.log_artifacts(files)
    run.finish()
    return run.run_id
