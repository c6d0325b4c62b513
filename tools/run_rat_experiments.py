#!/usr/bin/env python
"""Run the RAT ISIC 2018 experiments by group and collect every result into one table.

    python tools/run_rat_experiments.py segmentation ablations robustness [--quick] [--work-dir DIR]
    python tools/run_rat_experiments.py all --quick          # the whole chain on synthetic data, CPU

Groups: ``segmentation`` (single / dual / triple scale), ``ablations`` (the 13 configs in
``projects/RAT/configs/ablations``), ``robustness`` (each trained segmentation model evaluated at
``--resolutions``; needs the segmentation runs), ``all``.

Each training run goes to ``<work-dir>/<group>/<config>/`` and, once trained and tested (test
split, best-validation-Dice checkpoint), leaves ``result.json`` there; runs that have one are
skipped (``--force`` reruns them). A failed run is recorded with its log and the others go on.
The collected tables: ``<work-dir>/results.{md,csv}`` (one row per run) and
``<work-dir>/robustness.{md,csv,png}``. Exit code 1 if any run failed.

``--quick``: synthetic ISIC-like data (``rat_plugins.data.synthetic.make_isic``, written to
``<work-dir>/datasets`` once), 64 x 64 inputs, a quarter of the feature widths, 4 heads, one grouping
iteration, ``--iters`` training iterations; robustness at 32, 64, 128 and 256 pixels. Without it
the configs run as written (datasets under $RAT_DATASETS or ./datasets) - for GPU machines; for
multi-GPU training use ``tools/dist_train.sh`` per config and this tool's ``robustness`` group after.
"""
import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

from mmengine.config import Config, DictAction

import rat_plugins.mm  # noqa: F401  (registers the plugin's components)
from rat_plugins._atomic import atomic_write_text
from rat_plugins.mm.rat_experiments import (METRICS, evaluate_at_resolutions, plot_robustness, quick_overrides,
                                            robustness_rows, write_table)
from rat_plugins.mm.runner import build_runner

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "projects" / "RAT" / "configs"
SEGMENTATION = ["rat_isic_single_256", "rat_isic_dual_256-128", "rat_isic_triple_256-128-64"]
GROUPS = ("segmentation", "ablations", "robustness")
QUICK_DATA = dict(n=48, seed=0, size=(64, 128))
QUICK_RESOLUTIONS = [32, 64, 128, 256]
RESULT_COLUMNS = ["group", "experiment", "status", *METRICS, "train_seconds", "iters", "checkpoint"]


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


def load_run_config(config: Path, work_dir: Path, args) -> Config:
    cfg = Config.fromfile(str(config))
    if args.quick:
        quick_overrides(cfg, work_dir, iters=args.iters, seed=args.seed)
    else:
        cfg.work_dir = str(work_dir)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    # unique per run: mmengine keys its logger and visualizer instances by this name
    cfg.experiment_name = f"{config.stem}_{time.time_ns()}"
    return cfg


def train_and_test(config: Path, group: str, args) -> dict:
    work_dir = Path(args.work_dir) / group / config.stem
    result_path = work_dir / "result.json"
    if result_path.is_file() and not args.force:
        print(f"[rat] {group}/{config.stem}: done before, skipped ({result_path})")
        return json.loads(result_path.read_text())
    print(f"[rat] {group}/{config.stem}: training in {work_dir}")
    start = time.perf_counter()
    cfg = load_run_config(config, work_dir, args)
    runner = build_runner(cfg)
    runner.train()
    train_seconds = time.perf_counter() - start
    checkpoint = best_checkpoint(work_dir)
    test_cfg = copy.deepcopy(cfg)  # the Runner worked on its own copy: cfg is as loaded
    test_cfg.load_from = str(checkpoint)
    test_cfg.experiment_name = f"{config.stem}_test_{time.time_ns()}"
    metrics = build_runner(test_cfg).test()
    # the exact config that ran, for tools/evaluate_robustness.py and for the record
    run_config = work_dir / "run_config.py"
    atomic_write_text(run_config, cfg.pretty_text)
    result = {"group": group, "experiment": config.stem, "status": "ok", "config": str(config),
              "run_config": str(run_config), "checkpoint": str(checkpoint), "iters": cfg.train_cfg.max_iters,
              "train_seconds": round(train_seconds, 1), **{k: float(v) for k, v in metrics.items()}}
    atomic_write_text(result_path, json.dumps(result, indent=2))
    return result


def run_robustness(args, seg_results) -> list:
    series, rows = {}, []
    for name in SEGMENTATION:
        result = seg_results.get(name)
        if result is None or result.get("status") != "ok":
            print(f"[rat] robustness/{name}: no trained segmentation run in {args.work_dir}/segmentation/{name}; "
                  f"run the segmentation group first", file=sys.stderr)
            rows.append({"experiment": name, "status": "not run: no trained model"})
            continue
        out = Path(args.work_dir) / "robustness" / name
        try:
            model_rows = evaluate_at_resolutions(result["run_config"], result["checkpoint"], args.resolutions, out,
                                                 max_attention_gb=args.max_attention_gb)
        except Exception as e:  # one model's failure must not hide the others
            traceback.print_exc()
            rows.append({"experiment": name, "status": f"failed: {type(e).__name__}: {e}"})
            continue
        model_rows = robustness_rows(model_rows)
        series[name] = model_rows
        rows += [{"experiment": name, **r} for r in model_rows]
    columns = ["experiment", "resolution", "spacing", "status", *METRICS, "Dice_degradation_pct", "within_limit"]
    out = Path(args.work_dir)
    markdown = write_table(rows, columns, out / "robustness.md", out / "robustness.csv",
                           title="Resolution robustness (Dice degradation vs the training resolution)")
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("groups", nargs="+", choices=[*GROUPS, "all"])
    p.add_argument("--quick", action="store_true", help="synthetic data, tiny models, minutes on CPU")
    p.add_argument("--work-dir", default=None, help="default work_dirs/rat (work_dirs/rat_quick with --quick)")
    p.add_argument("--iters", type=int, default=150, help="training iterations in --quick mode")
    p.add_argument("--seed", type=int, default=0, help="random seed in --quick mode")
    p.add_argument("--resolutions", type=int, nargs="+", help="robustness resolutions "
                   f"(default 128 256 512 1024; --quick: {' '.join(map(str, QUICK_RESOLUTIONS))})")
    p.add_argument("--max-attention-gb", type=float, default=8.0)
    p.add_argument("--force", action="store_true", help="rerun runs that already have a result.json")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="overrides for every run, key=value")
    args = p.parse_args(argv)
    args.groups = list(GROUPS) if "all" in args.groups else [g for g in GROUPS if g in args.groups]
    args.work_dir = args.work_dir or ("work_dirs/rat_quick" if args.quick else "work_dirs/rat")
    args.resolutions = args.resolutions or (QUICK_RESOLUTIONS if args.quick else [128, 256, 512, 1024])
    return args


def prepare_quick_data(work_dir: Path) -> None:
    from rat_plugins.data.synthetic import make_isic

    root = work_dir / "datasets"
    if not (root / "isic2018").is_dir():
        print(f"[rat] quick mode: writing synthetic ISIC data to {root / 'isic2018'}")
        make_isic(root / "isic2018", **QUICK_DATA)
    os.environ["RAT_DATASETS"] = str(root.resolve())


def main(argv=None):
    args = parse_args(argv)
    work_dir = Path(args.work_dir)
    if args.quick and any(g != "robustness" for g in args.groups):
        prepare_quick_data(work_dir)  # robustness reads the data path from each run's config
    failed = []
    for group in [g for g in args.groups if g != "robustness"]:
        for config in group_configs(group):
            try:
                train_and_test(config, group, args)
            except Exception as e:  # record it and go on with the next run
                traceback.print_exc()
                run_dir = work_dir / group / config.stem
                failed.append(f"{group}/{config.stem}: {type(e).__name__}: {e} (logs in {run_dir})")
    results = collect(work_dir)
    columns_rows = results + [{"group": f.split("/")[0], "experiment": f.split("/")[1].split(":")[0],
                               "status": "failed"} for f in failed]
    markdown = write_table(columns_rows, RESULT_COLUMNS, work_dir / "results.md", work_dir / "results.csv",
                           title="RAT on ISIC 2018" + (" (quick mode: synthetic data)" if args.quick else ""))
    print(markdown)
    if "robustness" in args.groups:
        seg = {r["experiment"]: r for r in results if r["group"] == "segmentation"}
        rows = run_robustness(args, seg)
        failed += [f"robustness/{r['experiment']}: {r['status']}" for r in rows
                   if r.get("status", "ok") != "ok" and not r["status"].startswith("not run: dense")]
    if failed:
        print("failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    print(f"results: {work_dir}/results.md" + (f", {work_dir}/robustness.md" if "robustness" in args.groups else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
