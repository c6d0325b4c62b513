"""The OFAT study (ViTDet head detection): quick-mode overrides and the results table.

    python -m rat_plugins.experiments.ofat quick-overrides   # one key=value per line (run_single_ofat.sh)
    python -m rat_plugins.experiments.ofat best-combination [--quick]   # the combined-best config's path

The summary reads ``work_dirs/ofat_*``: test mAP and AP by size of the final model, training time,
the best epoch by validation mAP@0.5 with that score, the test mAP of the best-validation model
(``model_best.pth``), and peak memory; missing numbers stay blank, never zero.
"""

import argparse
import csv
import datetime
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import List, Optional

from rat_plugins.utils.atomic import atomic_path, atomic_write_text

from . import REPO

__all__ = [
    "OFAT_DIR",
    "COLUMNS",
    "config_names",
    "quick_overrides",
    "summarize_run",
    "markdown",
    "summarize",
    "summary_main",
]

OFAT_DIR = REPO / "projects" / "ViTDet" / "configs" / "OFAT"
PRETRAINED_VIM = REPO / "ckpts" / "vim_tiny_pretrained.pth"
COLUMNS = [
    "experiment",
    "status",
    "mAP@0.5",
    "mAP@0.5:0.95",
    "AP_small",
    "AP_medium",
    "AP_large",
    "train_time",
    "best_epoch",
    "best_val_mAP@0.5",
    "best_model_mAP@0.5",
    "best_model_mAP@0.5:0.95",
    "peak_memory_mb",
]
# the tenth run of the sweep: each factor at its best level (run_all_ofat.sh --with-best)
BEST_COMBINATION = "best_combination"
RANDOM_BACKBONE_WARNING = (
    "WARNING: quick mode without ckpts/vim_tiny_pretrained.pth: the ViM backbone is randomly "
    "initialised (frozen); figures show the machinery works, not the model's real accuracy."
)


# ----------------------------------------------------------------------------- quick mode
def quick_overrides(
    image_size: Optional[int] = None, epochs: Optional[int] = None, pretrained: Path = PRETRAINED_VIM
) -> List[str]:
    """``key=value`` overrides that shrink an OFAT config to a CPU smoke run.

    Small images (``RAT_QUICK_IMAGE_SIZE``, 128) for ``RAT_QUICK_EPOCHS`` (24) epochs, 64 channels
    in the pyramid, RPN and box heads and fewer RoIs per image: the 256-wide heads over 512 RoIs
    take ~40 s a step on 2 cores. Without ``pretrained`` the frozen backbone keeps its random
    initialisation; the fixed seed makes it the same in every quick run, so they share the
    frozen-feature cache.
    """
    image_size = image_size or os.environ.get("RAT_QUICK_IMAGE_SIZE") or 128
    epochs = epochs or os.environ.get("RAT_QUICK_EPOCHS") or 24
    overrides = [
        f"dataloader.image_size={image_size}",
        f"train.epochs={epochs}",
        "train.warmup_iters=20",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.final_test.num_workers=0",
        "train.log_period=5",
        "train.seed=0",
        "model.roi_heads.batch_size_per_image=32",
        "model.proposal_generator.post_nms_topk=[200,50]",
        "model.backbone.out_channels=64",
        "model.proposal_generator.head.in_channels=64",
    ]
    for stage in range(3):
        overrides += [
            f"model.roi_heads.box_heads.{stage}.conv_dims=[64,64,64,64]",
            f"model.roi_heads.box_heads.{stage}.input_shape.channels=64",
        ]
    if not Path(pretrained).is_file():
        overrides.append("model.backbone.net.checkpoint=")
    return overrides


# ----------------------------------------------------------------------------- summary
def config_names() -> List[str]:
    """The OFAT config stems, the baseline first."""
    names = sorted(p.stem for p in OFAT_DIR.glob("*.py"))
    return sorted(names, key=lambda n: not n.startswith("baseline"))


def read_metrics(run_dir: Path):
    """Training losses, validation records and peak memory from detectron2's metrics.json."""
    losses, evals, peak = [], [], None
    path = run_dir / "metrics.json"
    if not path.is_file():
        return losses, evals, peak
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written while we read
        if "total_loss" in rec:
            losses.append((rec["iteration"], rec["total_loss"]))
        if "bbox/AP50" in rec:
            evals.append((rec["iteration"], rec["bbox/AP50"], rec.get("bbox/AP")))
        if "peak_memory_mb" in rec:
            peak = max(peak or 0.0, rec["peak_memory_mb"])
    return losses, evals, peak


def iters_per_epoch(run_dir: Path) -> Optional[int]:
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        m = re.search(r"^\s+eval_period:\s*(\d+)", cfg.read_text(), re.M)
        if m:
            return int(m.group(1))
    return None


def training_seconds(run_dir: Path) -> Optional[float]:
    log = run_dir / "log.txt"
    if not log.is_file():
        return None
    total = 0.0
    for h, m, s in re.findall(r"Total training time: (\d+):(\d+):(\d+)", log.read_text()):
        total += int(h) * 3600 + int(m) * 60 + int(s)
    return total or None


def summarize_run(name: str, run_dir: Path) -> dict:
    """One table row from a run's work dir; ``_losses`` / ``_evals`` carry the curves for the plots."""
    if not run_dir.is_dir():
        return _row(name, "missing")
    losses, evals, peak = read_metrics(run_dir)
    final = run_dir / "final_metrics.json"
    status = "finished" if final.is_file() else ("unfinished" if losses else "not started")
    record = json.loads(final.read_text()) if final.is_file() else {}
    test = (record.get("test") or {}).get("bbox", {})
    per_epoch, seconds = iters_per_epoch(run_dir), training_seconds(run_dir)
    return _row(name, status, test, losses, evals, peak, per_epoch, seconds, record.get("best"))


def best_record(run_dir: Path) -> Optional[dict]:
    """A finished run's best-validation record (``final_metrics.json`` "best": metric, value, iteration,
    epoch, test), or None."""
    final = Path(run_dir) / "final_metrics.json"
    return json.loads(final.read_text()).get("best") if final.is_file() else None


def row_with_figures(row: dict, test: dict, best: Optional[dict], per_epoch: Optional[int] = None) -> dict:
    """``row`` with the final model's test figures ``test`` and the best-validation record ``best`` (figures
    measured again, e.g. by tools/ray_evaluate.py --ofat)."""
    fresh = _row(row["experiment"], row["status"], test, row["_losses"], row["_evals"], None, per_epoch, None, best)
    return dict(fresh, train_time=row["train_time"], peak_memory_mb=row["peak_memory_mb"])


def _fmt(value) -> str:
    return "" if value is None or value != value else f"{value:.1f}"  # NaN: no such objects


def _row(name, status, test=None, losses=(), evals=(), peak=None, per_epoch=None, seconds=None, best=None) -> dict:
    row = dict.fromkeys(COLUMNS, "")
    row["experiment"], row["status"] = name, status
    for col, key in (
        ("mAP@0.5", "AP50"),
        ("mAP@0.5:0.95", "AP"),
        ("AP_small", "APs"),
        ("AP_medium", "APm"),
        ("AP_large", "APl"),
    ):
        row[col] = _fmt((test or {}).get(key))
    scored = [e for e in evals if e[1] == e[1]]  # NaN (nothing detected yet) never counts as best
    if best:  # the best-validation model's record (model_best.json) and its test metrics
        best_iter, best_value = best["iteration"], best["value"]
        best_test = (best.get("test") or {}).get("bbox", {})
        row["best_model_mAP@0.5"], row["best_model_mAP@0.5:0.95"] = (
            _fmt(best_test.get("AP50")),
            _fmt(best_test.get("AP")),
        )
    elif scored:
        best_iter, best_value = max(scored, key=lambda e: e[1])[:2]
    if best or scored:
        row["best_epoch"] = str(round((best_iter + 1) / per_epoch)) if per_epoch else f"iter {best_iter}"
        row["best_val_mAP@0.5"] = _fmt(best_value)
    if seconds:
        row["train_time"] = str(datetime.timedelta(seconds=int(seconds)))
    if peak:
        row["peak_memory_mb"] = f"{peak:.0f}"
    row["_losses"], row["_evals"] = list(losses), list(evals)
    return row


_MLFLOW_STATUS = {"FINISHED": "finished", "RUNNING": "unfinished", "KILLED": "stopped", "FAILED": "failed"}


def summarize_mlflow_run(name: str, client, run) -> dict:
    """One table row from an MLflow run (what :class:`rat_plugins.tracking.MlflowRun` logged)."""
    metrics = run.data.metrics
    status = _MLFLOW_STATUS.get(run.info.status, run.info.status.lower())
    prefix = "final/test/bbox/"
    test = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    best = None
    if "final/best/iteration" in metrics:
        best_prefix = "final/best/test/bbox/"
        best_test = {k[len(best_prefix) :]: v for k, v in metrics.items() if k.startswith(best_prefix)}
        best = dict(iteration=int(metrics["final/best/iteration"]), value=metrics["final/best/value"])
        best["test"] = dict(bbox=best_test)
    history = {key: client.get_metric_history(run.info.run_id, key) for key in ("total_loss", "bbox/AP50")}
    losses = [(m.step, m.value) for m in sorted(history["total_loss"], key=lambda m: m.step)]
    evals = [(m.step, m.value, None) for m in sorted(history["bbox/AP50"], key=lambda m: m.step)]
    peak = max((m.value for m in client.get_metric_history(run.info.run_id, "peak_memory_mb")), default=None)
    per_epoch = run.data.params.get("train.eval_period")
    seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None
    return _row(name, status, test, losses, evals, peak, int(per_epoch) if per_epoch else None, seconds, best)


def markdown(rows) -> str:
    out = io.StringIO()
    out.write("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n")
    for r in rows:
        out.write("| " + " | ".join(r[c] or "—" for c in COLUMNS) + " |\n")
    return out.getvalue()


def to_csv(rows) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot(rows, out_dir: Path) -> None:
    """Training loss and validation mAP@0.5 against iteration, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, ylabel, fname in (
        ("_losses", "training loss", "ofat_loss.png"),
        ("_evals", "validation mAP@0.5", "ofat_val_map.png"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in rows:
            series = r.get(key) or []
            if series:
                ax.plot([p[0] for p in series], [p[1] for p in series], label=r["experiment"])
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        try:
            with atomic_path(out_dir / fname) as tmp:
                fig.savefig(tmp, dpi=100, format="png")
        finally:
            plt.close(fig)


def _mlflow_rows(uri: str, names) -> list:
    """The rows of the OFAT experiment's runs in an MLflow store (runs named as their work dirs)."""
    from mlflow.tracking import MlflowClient

    from rat_plugins.utils.config_keys import ConfigError

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("OFAT")
    if experiment is None:
        raise ConfigError(f"no OFAT experiment in the MLflow store {uri}: give the store the OFAT runs logged to")
    runs = {}
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
        runs[run.info.run_name] = run  # the latest run of a name wins
    rows = [
        summarize_mlflow_run(n, client, runs[f"ofat_{n}"]) if f"ofat_{n}" in runs else _row(n, "missing") for n in names
    ]
    rows += [
        summarize_mlflow_run(f"{n} (quick)", client, runs[f"ofat_{n}_quick"])
        for n in names
        if f"ofat_{n}_quick" in runs
    ]
    return rows


def summarize(work_dirs: Path, out_dir: Path, mlflow_uri: Optional[str] = None, ran_only: bool = False) -> str:
    """Write ``ofat_summary.{md,csv}`` and the two plots to ``out_dir``; returns the Markdown table. The
    rows come from the work dirs, or from the MLflow store at ``mlflow_uri``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = config_names()
    if (work_dirs / f"ofat_{BEST_COMBINATION}").is_dir() or (work_dirs / f"ofat_{BEST_COMBINATION}_quick").is_dir():
        names.append(BEST_COMBINATION)
    if mlflow_uri:
        rows = _mlflow_rows(mlflow_uri, names)
    else:
        ran = [n for n in names if (work_dirs / f"ofat_{n}").is_dir()] if ran_only else names
        rows = [summarize_run(n, work_dirs / f"ofat_{n}") for n in ran]
        # quick (smoke) runs appear only when present, labelled as such
        rows += [
            summarize_run(f"{n} (quick)", work_dirs / f"ofat_{n}_quick")
            for n in names
            if (work_dirs / f"ofat_{n}_quick").is_dir()
        ]
    return write_summary(rows, out_dir)


def write_summary(rows, out_dir: Path) -> str:
    """``ofat_summary.{md,csv}`` and the two plots of ``rows`` in ``out_dir``; returns the Markdown table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    atomic_write_text(out_dir / "ofat_summary.md", table)
    atomic_write_text(out_dir / "ofat_summary.csv", to_csv(rows))
    plot(rows, out_dir)
    return table


def summary_main(argv=None) -> int:
    """``tools/summarize_ofat.py``."""
    parser = argparse.ArgumentParser(
        description="Fill the OFAT comparison table from work_dirs/ofat_*: Markdown, CSV and PNG plots."
    )
    parser.add_argument("--work-dirs", type=Path, default=Path(os.environ.get("RAT_WORK_DIRS", REPO / "work_dirs")))
    parser.add_argument("--out", type=Path, default=None, help="where to write the table and plots")
    parser.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        default=None,
        metavar="URI",
        help="read the runs from an MLflow store instead of the work dirs (default URI: "
        "sqlite:///<work-dirs>/mlflow.db, the store the runs log to)",
    )
    parser.add_argument("--ran-only", action="store_true", help="rows only for the runs that have a work dir")
    args = parser.parse_args(argv)
    out_dir = args.out or args.work_dirs
    uri = None
    if args.mlflow is not None:
        uri = args.mlflow or "sqlite:///" + str((args.work_dirs / "mlflow.db").resolve())
    from rat_plugins.utils.config_keys import ConfigError

    try:
        table = summarize(args.work_dirs, out_dir, uri, ran_only=args.ran_only)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    files = [out_dir / name for name in ("ofat_summary.md", "ofat_summary.csv", "ofat_loss.png", "ofat_val_map.png")]
    print("written: " + ", ".join(map(str, files)))
    from rat_plugins.tracking import log_study_summary

    store = uri or "sqlite:///" + str((args.work_dirs / "mlflow.db").resolve())
    if log_study_summary(out_dir, "OFAT", store, files):
        print(f"MLflow: the table and plots are the artifacts of the run 'summary' of OFAT in {store}")
    return 0


# ----------------------------------------------------------------------------- the best combination
BASELINE = "baseline_lr0.001_bs8_adamw_ep100"
_LEVELS = re.compile(r"_lr(?P<lr>[\d.]+)_bs(?P<batch>\d+)_(?P<optimizer>[a-z]+)_ep(?P<epochs>\d+)$")
FACTORS = {"lr": "learning rate", "batch": "batch size", "optimizer": "optimizer", "epochs": "epochs"}


def factor_levels(name: str) -> dict:
    """``{'lr': '0.001', 'batch': '8', 'optimizer': 'adamw', 'epochs': '100'}`` from an OFAT config name."""
    found = _LEVELS.search(name)
    if found is None:
        raise ValueError(f"{name} is not an OFAT config name (..._lr<LR>_bs<B>_<optimizer>_ep<E>)")
    return found.groupdict()


def best_validation_score(run_dir: Path) -> Optional[float]:
    """A finished run's best validation mAP@0.5 (its model_best.json, else its evaluations), or None."""
    final = run_dir / "final_metrics.json"
    if not final.is_file():
        return None
    best = json.loads(final.read_text()).get("best")
    if best:
        return float(best["value"])
    scores = [e[1] for e in read_metrics(run_dir)[1] if e[1] == e[1]]
    return max(scores) if scores else None


def best_combination(work_dirs: Path, quick: bool = False):
    """Each factor at its level with the best validation mAP@0.5 among the baseline and that factor's
    finished runs. Returns ({factor: (level, run name)}, lines saying why); runs not finished are left
    out and named. Raises ConfigError when the baseline has not finished (every comparison needs it)."""
    from rat_plugins.utils.config_keys import ConfigError

    suffix = "_quick" if quick else ""
    scores = {n: best_validation_score(Path(work_dirs) / f"ofat_{n}{suffix}") for n in config_names()}
    if scores.get(BASELINE) is None:
        raise ConfigError(
            f"the baseline run {Path(work_dirs) / f'ofat_{BASELINE}{suffix}'} has not finished (or has no "
            "validation mAP@0.5): the best combination compares every factor with it; run the sweep first"
        )
    base = factor_levels(BASELINE)
    chosen, why = {}, []
    for factor, label in FACTORS.items():
        runs = [n for n in config_names() if n == BASELINE or _only_change(n, base) == factor]
        finished = [n for n in runs if scores[n] is not None]
        winner = max(finished, key=lambda n: (scores[n], n == BASELINE))  # a tie keeps the baseline level
        chosen[factor] = (factor_levels(winner)[factor], winner)
        compared = ", ".join(f"{factor_levels(n)[factor]}: {scores[n]:.1f}" for n in finished)
        missing = [n for n in runs if scores[n] is None]
        line = f"{label}: {chosen[factor][0]} (validation mAP@0.5 {compared})"
        why.append(line + (f"; not finished, left out: {', '.join(missing)}" if missing else ""))
    return chosen, why


def _only_change(name: str, base: dict) -> Optional[str]:
    changed = [k for k, v in factor_levels(name).items() if v != base[k]]
    return changed[0] if len(changed) == 1 else None


def write_best_combination(work_dirs: Path, quick: bool = False) -> Path:
    """The combined-best LazyConfig, ``<work_dirs>/ofat_best_combination[_quick]/best_combination.py``: it
    inherits the baseline and sets each factor to its best level. Returns its path."""
    chosen, why = best_combination(work_dirs, quick)
    levels = {factor: level for factor, (level, _) in chosen.items()}
    base = factor_levels(BASELINE)
    lines = [
        "# OFAT best combination: each factor at its best level by validation mAP@0.5, written by",
        f"# run_all_ofat.sh --with-best from the runs in {Path(work_dirs).resolve()} (regenerated each time).",
        *[f"#   {line}" for line in why],
        "from detectron2.config import LazyConfig",
        "",
        "from rat_plugins.detectron2.schedule import set_epoch_schedule",
        "",
        "model, dataloader, optimizer, train, lr_multiplier = LazyConfig.load(",
        f'    "{OFAT_DIR / (BASELINE + ".py")}", ("model", "dataloader", "optimizer", "train", "lr_multiplier")',
        ")",
    ]
    if levels["optimizer"] != base["optimizer"]:
        lines.append(f'optimizer = LazyConfig.load("{OFAT_DIR / (chosen["optimizer"][1] + ".py")}", "optimizer")')
    lines.append(f"optimizer.lr = {float(levels['lr'])}")
    lines.append(f"dataloader.train.total_batch_size = {int(levels['batch'])}")
    lines.append(f"set_epoch_schedule(train, lr_multiplier, dataloader, epochs={int(levels['epochs'])})")
    path = Path(work_dirs) / f"ofat_{BEST_COMBINATION}{'_quick' if quick else ''}" / f"{BEST_COMBINATION}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- sweeps on a scheduler
def sweep_manifest(out: Path, work_dirs: Path, quick: bool = False, names=None, overrides=()) -> Path:
    """Write the manifest of the OFAT sweep (one run per config, as run_all_ofat.sh runs them) for
    ``python -m rat_plugins.cluster.sweep submit``; the summary table is its dependent job."""
    from rat_plugins.cluster.sweep import write_manifest

    suffix = "_quick" if quick else ""
    runs = [
        dict(
            name=name,
            config=str((OFAT_DIR / f"{name}.py").relative_to(REPO)),
            work_dir=str(Path(work_dirs).resolve() / f"ofat_{name}{suffix}"),
            overrides=(quick_overrides() if quick else []) + list(overrides),
        )
        for name in (names or config_names())
    ]
    summary = [sys.executable, "tools/summarize_ofat.py", "--work-dirs", str(Path(work_dirs).resolve())]
    return write_manifest(out, "ofat" + suffix, runs, summary)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rat_plugins.experiments.ofat", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["quick-overrides", "sweep-manifest", "best-combination"])
    parser.add_argument("out", nargs="?", type=Path, help="sweep-manifest: the manifest file to write")
    parser.add_argument("overrides", nargs="*", help="sweep-manifest: key=value overrides of every run")
    parser.add_argument("--quick", action="store_true", help="sweep-manifest: quick-mode runs")
    parser.add_argument("--names", nargs="+", help="sweep-manifest: only these configs")
    parser.add_argument("--work-dirs", type=Path, default=Path(os.environ.get("RAT_WORK_DIRS", REPO / "work_dirs")))
    args = parser.parse_intermixed_args(argv)
    if not PRETRAINED_VIM.is_file() and (args.command == "quick-overrides" or args.quick):
        print(RANDOM_BACKBONE_WARNING, file=sys.stderr)
    if args.command == "quick-overrides":
        print("\n".join(quick_overrides()))
        return 0
    if args.command == "best-combination":
        from rat_plugins.utils.config_keys import ConfigError

        try:
            path = write_best_combination(args.work_dirs, args.quick)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(path.read_text().split("from detectron2")[0], file=sys.stderr, end="")
        print(path)
        return 0
    if args.out is None:
        parser.error("sweep-manifest needs the manifest path")
    unknown = sorted(set(args.names or ()) - set(config_names()))
    if unknown:
        parser.error(f"unknown OFAT configs {unknown}; choose from {config_names()}")
    print(sweep_manifest(args.out, args.work_dirs, args.quick, args.names, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
