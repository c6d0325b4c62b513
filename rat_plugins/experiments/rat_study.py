"""The RAT study on ISIC 2018 (mmseg): experiment groups, quick mode, and the collected results.

Groups: ``segmentation`` (single / dual / triple scale), ``ablations`` (``projects/RAT/configs/
ablations``) and ``robustness`` (each trained segmentation model at several resolutions). Each run
leaves ``result.json`` in its work dir once trained and tested, and is skipped when it has one.
Quick mode shrinks every config to a CPU run on synthetic data (:func:`quick_overrides`).
"""

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from rat_plugins.utils.atomic import atomic_write_text

from . import REPO
from .robustness import METRICS, evaluate_at_resolutions, plot_robustness, resize_transforms, robustness_rows
from .tables import write_table

STUDY = "RAT ISIC"  # the MLflow experiment the study's runs log to (the name their configs' folder gives)

__all__ = [
    "CONFIGS",
    "SEGMENTATION",
    "GROUPS",
    "quick_overrides",
    "group_configs",
    "best_checkpoint",
    "train_and_test",
    "collect",
    "main",
]

CONFIGS = REPO / "projects" / "RAT" / "configs"
SEGMENTATION = ["rat_isic_single_256", "rat_isic_dual_256-128", "rat_isic_triple_256-128-64"]
GROUPS = ("segmentation", "ablations", "robustness")
QUICK_DATA = dict(n=48, seed=0, size=(64, 128))
QUICK_RESOLUTIONS = [32, 64, 128, 256]
# Dice and IoU pooled over the test pixels, and averaged over its images (the ISIC convention)
PER_IMAGE = ("Dice_per_image", "IoU_per_image")
RESULT_COLUMNS = ["group", "experiment", "status", *METRICS, *PER_IMAGE, "train_seconds", "iters", "checkpoint"]
ROBUSTNESS_COLUMNS = [
    "experiment",
    "resolution",
    "spacing",
    "status",
    *METRICS,
    "Dice_degradation_pct",
    "within_limit",
    "seconds",
    "memory_gb",
]


# ----------------------------------------------------------------------------- quick mode
def _scaled_width(width: int, factor: float) -> int:
    return max(8, int(round(width * factor)))


def quick_overrides(
    cfg,
    work_dir,
    size: int = 64,
    iters: int = 60,
    width_factor: float = 0.25,
    num_heads: int = 4,
    grouping_iters: int = 1,
    batch_size: int = 4,
    val_interval: Optional[int] = None,
    seed: int = 0,
):
    """Shrink a RAT ISIC config (in place) for a CPU run in seconds, keeping what its experiment
    varies (scales, depth, attention kind, positional encoding, ratio of feature widths).

    ``size``: square input (train and test); ``width_factor`` scales ``feature_dims`` and the head's
    channels; ``iters``: training iterations (cosine schedule shortened to match), validation every
    ``val_interval`` iterations (default: once, at the end) with the best-Dice checkpoint kept.
    """
    bb, head = cfg.model.backbone, cfg.model.decode_head
    bb.feature_dims = _scaled_width(bb.feature_dims, width_factor)
    bb.update(num_heads=num_heads, iters=grouping_iters)
    head.update(in_channels=[bb.feature_dims] * len(head.in_index), channels=_scaled_width(head.channels, width_factor))
    if "pool_scales" in head:  # UPerHead's pyramid pooling
        head.pool_scales = (1, 2)
    if "auxiliary_head" in cfg.model and cfg.model.auxiliary_head:
        raise ValueError("quick_overrides: configs with an auxiliary head are not handled")
    cfg.model.data_preprocessor.size = (size, size)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        for step in resize_transforms(cfg[loader].dataset.pipeline):
            step.update(scale=(size, size), keep_ratio=False)
        cfg[loader].update(num_workers=0, persistent_workers=False)
    cfg.train_dataloader.batch_size = batch_size
    val_interval = val_interval or iters
    cfg.train_cfg.update(max_iters=iters, val_interval=val_interval)
    for scheduler in cfg.param_scheduler:
        scheduler.end = iters
    cfg.default_hooks.checkpoint.update(interval=val_interval, max_keep_ckpts=1)
    cfg.default_hooks.logger.interval = max(1, min(10, iters // 5))
    cfg.vis_backends = [dict(type="LocalVisBackend")]
    cfg.visualizer.vis_backends = cfg.vis_backends
    cfg.env_cfg.cudnn_benchmark = False
    cfg.randomness = dict(seed=seed)
    cfg.work_dir = str(work_dir)
    return cfg


def prepare_quick_data(work_dir: Path) -> None:
    """Synthetic ISIC-like data under ``<work_dir>/datasets`` (written once), made the dataset root."""
    import shutil
    import tempfile

    from rat_plugins.data.synthetic import make_isic

    root = work_dir / "datasets"
    if not (root / "isic2018").is_dir():
        print(f"[rat] quick mode: writing synthetic ISIC data to {root / 'isic2018'}")
        root.mkdir(parents=True, exist_ok=True)
        # written aside and renamed: runs started together (array tasks) never read a half-written set
        partial = Path(tempfile.mkdtemp(prefix=".isic2018-", dir=root))
        make_isic(partial, **QUICK_DATA)
        try:
            partial.rename(root / "isic2018")
        except OSError:  # another run finished first: its copy is the same (fixed seed)
            shutil.rmtree(partial, ignore_errors=True)
    os.environ["RAT_DATASETS"] = str(root.resolve())


# ----------------------------------------------------------------------------- runs
def group_configs(group: str):
    if group == "segmentation":
        return [CONFIGS / f"{name}.py" for name in SEGMENTATION]
    if group == "ablations":
        return sorted((CONFIGS / "ablations").glob("*.py"))
    raise ValueError(group)


def best_checkpoint(work_dir: Path) -> Path:
    """The best-validation-Dice checkpoint mmengine kept, else the last one."""
    best = sorted(work_dir.glob("best_Dice_iter_*.pth"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if best:
        return best[-1]
    last = work_dir / "last_checkpoint"
    if last.is_file():
        return Path(last.read_text().strip())
    raise FileNotFoundError(f"no checkpoint in {work_dir}")


def load_run_config(config: Path, work_dir: Path, args):
    from mmengine.config import Config

    cfg = Config.fromfile(str(config))
    if args.quick:
        quick_overrides(cfg, work_dir, iters=args.iters, seed=args.seed, **getattr(args, "quick_kwargs", {}))
    else:
        cfg.work_dir = str(work_dir)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    # unique per run: mmengine keys its logger and visualizer instances by this name
    cfg.experiment_name = f"{config.stem}_{time.time_ns()}"
    return cfg


def train_and_test(config: Path, group: str, args) -> dict:
    """Train one config, test its best checkpoint on the test split, write and return ``result.json``."""
    from rat_plugins.mm.runner import add_tracking, build_runner
    from rat_plugins.tracking import continue_run

    work_dir = Path(args.work_dir) / group / config.stem
    result_path = work_dir / "result.json"
    if result_path.is_file() and not args.force:
        print(f"[rat] {group}/{config.stem}: done before, skipped ({result_path})")
        return json.loads(result_path.read_text())
    print(f"[rat] {group}/{config.stem}: training in {work_dir}")
    start = time.perf_counter()
    cfg = load_run_config(config, work_dir, args)
    test_cfg = copy.deepcopy(cfg)  # the test logs into the training's MLflow run below, not a run of its own
    add_tracking(cfg, run_name=f"{group}/{config.stem}", tracking_uri=study_store(args.work_dir))
    build_runner(cfg).train()
    train_seconds = time.perf_counter() - start
    checkpoint = best_checkpoint(work_dir)
    test_cfg.load_from = str(checkpoint)
    test_cfg.experiment_name = f"{config.stem}_test_{time.time_ns()}"
    metrics = build_runner(test_cfg).test()
    # the exact config that ran, for tools/evaluate_robustness.py and for the record
    run_config = work_dir / "run_config.py"
    atomic_write_text(run_config, cfg.pretty_text)
    result = {
        "group": group,
        "experiment": config.stem,
        "status": "ok",
        "config": str(config),
        "run_config": str(run_config),
        "checkpoint": str(checkpoint),
        "iters": cfg.train_cfg.max_iters,
        "train_seconds": round(train_seconds, 1),
        **{k: float(v) for k, v in metrics.items()},
    }
    atomic_write_text(result_path, json.dumps(result, indent=2))
    run = continue_run(work_dir)
    if run is not None:
        run.log_metrics({"train_seconds": result["train_seconds"]}, step=result["iters"])
        run.set_tags({"checkpoint": str(checkpoint), "group": group})
        run.close("FINISHED", {"test": metrics}, step=result["iters"], files=[result_path, run_config])
    return result


def study_store(work_dir) -> str:
    """One MLflow store for the whole study: ``$MLFLOW_TRACKING_URI``, else ``<work dir>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(Path(work_dir).resolve() / "mlflow.db")


def mlflow_results(uri: str) -> list:
    """The study's rows from an MLflow store, as :func:`collect` reads them from the work dirs: the
    newest run of each experiment, its test metrics (``final/test/...``) and what ``result.json`` holds."""
    from mlflow.tracking import MlflowClient

    from rat_plugins.utils.config_keys import ConfigError

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(STUDY)
    if experiment is None:
        raise ConfigError(
            f"no {STUDY!r} experiment in the MLflow store {uri}: give the store the study's runs logged to"
        )
    newest = {}
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]):
        newest[run.info.run_name] = run
    rows = []
    for name, run in newest.items():
        if run.data.tags.get("rat.summary") == "true":
            continue  # the study's tables, not one of its runs
        group, _, experiment_name = name.partition("/")
        metrics, tested = run.data.metrics, "final/test/Dice" in run.data.metrics
        rows.append(
            {
                "group": group,
                "experiment": experiment_name,
                "status": "ok" if tested else f"not tested ({run.info.status})",
                **{m: metrics.get(f"final/test/{m}") for m in (*METRICS, *PER_IMAGE)},
                "train_seconds": metrics.get("train_seconds"),
                "iters": run.data.params.get("train_cfg.max_iters"),
                "checkpoint": run.data.tags.get("checkpoint"),
            }
        )
    order = {g: i for i, g in enumerate(GROUPS)}
    return sorted(rows, key=lambda r: (order.get(r["group"], len(order)), r["experiment"]))


def run_robustness(args, seg_results) -> list:
    """Every trained segmentation model at ``args.resolutions``: ``robustness.{md,csv,png}``."""
    series, rows = {}, []
    for name in SEGMENTATION:
        result = seg_results.get(name)
        if result is None or result.get("status") != "ok":
            print(
                f"[rat] robustness/{name}: no trained segmentation run in {args.work_dir}/segmentation/{name}; "
                f"run the segmentation group first",
                file=sys.stderr,
            )
            rows.append({"experiment": name, "status": "not run: no trained model"})
            continue
        out = Path(args.work_dir) / "robustness" / name
        try:
            model_rows = evaluate_at_resolutions(
                result["run_config"],
                result["checkpoint"],
                args.resolutions,
                out,
                max_memory_gb=args.max_memory_gb,
            )
        except Exception as e:  # one model's failure must not hide the others
            traceback.print_exc()
            rows.append({"experiment": name, "status": f"failed: {type(e).__name__}: {e}"})
            continue
        model_rows = robustness_rows(model_rows)
        series[name] = model_rows
        rows += [{"experiment": name, **r} for r in model_rows]
    out = Path(args.work_dir)
    markdown = write_table(
        rows,
        ROBUSTNESS_COLUMNS,
        out / "robustness.md",
        out / "robustness.csv",
        title="Resolution robustness (Dice degradation vs the training resolution)",
    )
    plot_robustness(series, out / "robustness.png")
    print(markdown)
    return rows


def collect(work_dir: Path) -> list:
    """Every result.json under the work dir (this call's runs and earlier ones)."""
    rows = []
    for group in ("segmentation", "ablations"):
        for path in sorted((work_dir / group).glob("*/result.json")):
            rows.append(json.loads(path.read_text()))
    return rows


def write_results(rows, work_dir: Path, quick: bool) -> str:
    """``results.{md,csv}`` in the work dir; returns the Markdown."""
    title = "RAT on ISIC 2018" + (" (quick mode: synthetic data)" if quick else "")
    return write_table(rows, RESULT_COLUMNS, work_dir / "results.md", work_dir / "results.csv", title=title)


# ----------------------------------------------------------------------------- sweeps on a scheduler
def _without(argv, option: str, takes_value: bool = True):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = takes_value
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def sweep_manifest(args, argv) -> Path:
    """One sweep run per experiment of the training groups (this CLI with ``--only NAME``); the
    dependent summary job is this CLI over all of them again, which finds every run done (their
    ``result.json``), writes the table and runs the robustness group when it was asked for."""
    from rat_plugins.cluster.sweep import write_manifest

    work_dir = Path(args.work_dir).resolve()
    base = [sys.executable, "tools/run_rat_experiments.py", *_without(argv, "--sweep-manifest")]
    base = _without(_without(base, "--only"), "--work-dir") + ["--work-dir", str(work_dir)]
    runs = [
        dict(
            name=f"{group}/{config.stem}",
            command=[*[a for a in base if a not in GROUPS and a != "all"], group, "--only", config.stem],
            work_dir=str(work_dir / group / config.stem),
            done_file="result.json",
        )
        for group in args.groups
        if group != "robustness"
        for config in group_configs(group)
        if not args.only or config.stem in args.only
    ]
    return write_manifest(args.sweep_manifest, "rat" + ("_quick" if args.quick else ""), runs, summary=base)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(
        description="Run the RAT ISIC 2018 experiments by group and collect every result into one table."
    )
    p.add_argument("groups", nargs="+", choices=[*GROUPS, "all"])
    p.add_argument("--quick", action="store_true", help="synthetic data, tiny models, minutes on CPU")
    p.add_argument("--work-dir", default=None, help="default work_dirs/rat (work_dirs/rat_quick with --quick)")
    p.add_argument("--iters", type=int, default=150, help="training iterations in --quick mode")
    p.add_argument("--seed", type=int, default=0, help="random seed in --quick mode")
    p.add_argument(
        "--resolutions",
        type=int,
        nargs="+",
        help=f"robustness resolutions (default 128 256 512 1024; --quick: {' '.join(map(str, QUICK_RESOLUTIONS))})",
    )
    p.add_argument("--max-memory-gb", type=float, default=8.0, help="see tools/evaluate_robustness.py")
    p.add_argument("--force", action="store_true", help="rerun runs that already have a result.json")
    p.add_argument(
        "--mlflow",
        nargs="?",
        const="",
        metavar="URI",
        help="only write the results table, from an MLflow store instead of the work dirs (default URI: "
        "sqlite:///<work-dir>/mlflow.db, the store the study's runs log to)",
    )
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="overrides for every run, key=value")
    p.add_argument(
        "--coco-results",
        type=Path,
        metavar="FINAL_METRICS_JSON",
        help="the final_metrics.json of a RAT COCO run (projects/RAT/configs/coco), for the detection criterion",
    )
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these experiments (config names) of the groups")
    p.add_argument(
        "--sweep-manifest",
        metavar="FILE",
        help="write a manifest for `python -m rat_plugins.cluster.sweep submit FILE` (one array task per "
        "experiment, the table and robustness as the dependent job) instead of running",
    )
    args = p.parse_args(argv)
    args.groups = list(GROUPS) if "all" in args.groups else [g for g in GROUPS if g in args.groups]
    args.work_dir = args.work_dir or ("work_dirs/rat_quick" if args.quick else "work_dirs/rat")
    args.resolutions = args.resolutions or (QUICK_RESOLUTIONS if args.quick else [128, 256, 512, 1024])
    return args


def main(argv=None) -> int:
    """``tools/run_rat_experiments.py``: 1 if any run failed."""
    import rat_plugins.mm  # noqa: F401  (registers the plugin's components)

    args = parse_args(argv)
    work_dir = Path(args.work_dir)
    if args.sweep_manifest:
        print(sweep_manifest(args, argv if argv is not None else sys.argv[1:]))
        return 0
    if args.mlflow is not None:
        from rat_plugins.utils.config_keys import ConfigError

        try:
            rows = [r for r in mlflow_results(args.mlflow or study_store(work_dir)) if r["group"] in args.groups]
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(write_results(rows, work_dir, args.quick))
        return 0
    known = {c.stem for g in args.groups if g != "robustness" for c in group_configs(g)}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        print(
            f"error: --only {unknown}: not experiments of {args.groups}; choose from {sorted(known)}", file=sys.stderr
        )
        return 2
    if args.quick and any(g != "robustness" for g in args.groups):
        prepare_quick_data(work_dir)  # robustness reads the data path from each run's config
    failed = []
    for group in [g for g in args.groups if g != "robustness"]:
        for config in group_configs(group):
            if args.only and config.stem not in args.only:
                continue
            try:
                train_and_test(config, group, args)
            except Exception as e:  # record it and go on with the next run
                traceback.print_exc()
                logs = work_dir / group / config.stem
                failed.append((group, config.stem, f"{type(e).__name__}: {e} (logs in {logs})"))
    results = collect(work_dir)
    rows = results + [{"group": group, "experiment": name, "status": "failed"} for group, name, _ in failed]
    print(write_results(rows, work_dir, args.quick))
    failures = [f"{group}/{name}: {why}" for group, name, why in failed]
    if "robustness" in args.groups:
        seg = {r["experiment"]: r for r in results if r["group"] == "segmentation"}
        failures += [
            f"robustness/{r['experiment']}: {r['status']}"
            for r in run_robustness(args, seg)
            if r.get("status", "ok") != "ok" and not r["status"].startswith("not run: a test forward")
        ]
    from rat_plugins.tracking import log_study_summary

    tables = [work_dir / f"results.{ext}" for ext in ("md", "csv")]
    if "robustness" in args.groups:
        tables += [work_dir / f"robustness.{ext}" for ext in ("md", "csv", "png")]
    from .criteria import write_criteria

    print(write_criteria(work_dir, rows, args.quick, args.coco_results))
    tables.append(work_dir / "criteria.md")
    log_study_summary(work_dir, STUDY, study_store(work_dir), tables)
    if failures:
        print("failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"results: {work_dir}/results.md" + (f", {work_dir}/robustness.md" if "robustness" in args.groups else ""))
    return 0
