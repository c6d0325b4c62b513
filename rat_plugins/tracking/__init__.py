"""Experiment tracking shared by both tool families: one MLflow run per training run."""

from .mlflow_run import (
    RUN_FILE,
    MlflowRun,
    continue_run,
    experiment_for_config,
    flatten_metrics,
    log_study_summary,
    tracking_enabled,
    tracking_uri,
)

__all__ = [
    "RUN_FILE",
    "MlflowRun",
    "continue_run",
    "experiment_for_config",
    "flatten_metrics",
    "log_study_summary",
    "tracking_enabled",
    "tracking_uri",
]
