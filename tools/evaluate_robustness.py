#!/usr/bin/env python
"""Evaluate one trained RAT segmentation model at several input resolutions.

    python tools/evaluate_robustness.py --config C --checkpoint K --resolutions 128 256 512 1024 \
        [--train-resolution 256] [--metric Dice] [--out DIR] [--max-attention-gb 8] [--cfg-options k=v ...]

The test images are resized to each resolution and the backbone's pixel spacing scaled so the
physical extent is preserved; masks are scored at their own size. Writes ``robustness.md``,
``robustness.csv`` and ``robustness.png`` to ``--out`` (default ``work_dirs/robustness/<config>``):
every metric per resolution and its degradation (%) against the training resolution, which is
always evaluated; the success criterion is at most 10 % degradation of ``--metric``.

``C`` may be the config a run dumped into its work dir (e.g. after ``tools/run_rat_experiments.py
--quick``), so the evaluated model is exactly the one trained. Exit code 1 when some resolution
could not be evaluated (the table says why), 2 for bad arguments.
"""
import argparse
import sys
from pathlib import Path

from mmengine.config import DictAction

import rat_plugins.mm  # noqa: F401  (registers the plugin's components)
from rat_plugins.mm.rat_experiments import (DEGRADATION_LIMIT_PCT, METRICS, evaluate_at_resolutions,
                                            plot_robustness, robustness_rows, write_table)

TABLE_COLUMNS = ["resolution", "spacing", "status", *METRICS, "{metric}_degradation_pct", "within_limit"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="mmseg config of the trained model")
    p.add_argument("--checkpoint", required=True, help="checkpoint (.pth) of that model")
    p.add_argument("--resolutions", type=int, nargs="+", required=True, help="square test sizes in pixels")
    p.add_argument("--train-resolution", type=int, help="default: the training pipeline's Resize scale")
    p.add_argument("--metric", default="Dice", choices=METRICS, help="metric judged against the 10 %% limit")
    p.add_argument("--out", help="output folder (default work_dirs/robustness/<config name>)")
    p.add_argument("--max-attention-gb", type=float, default=8.0,
                   help="skip resolutions whose largest dense attention matrix exceeds this (GB)")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="config overrides, key=value")
    return p.parse_args(argv)


def report(rows, out: Path, name: str, metric: str):
    """Write the table and plot; returns the Markdown and the rows with degradations."""
    rows = robustness_rows(rows, metric)
    columns = [c.format(metric=metric) for c in TABLE_COLUMNS]
    markdown = write_table(rows, columns, out / "robustness.md", out / "robustness.csv",
                           title=f"Resolution robustness: {name}")
    plot_robustness({name: rows}, out / "robustness.png", metric)
    return markdown, rows


def main(argv=None):
    args = parse_args(argv)
    config, checkpoint = Path(args.config), Path(args.checkpoint)
    for label, path in (("config", config), ("checkpoint", checkpoint)):
        if not path.is_file():
            print(f"error: {label} not found: {path}", file=sys.stderr)
            return 2
    if any(r < 8 for r in args.resolutions):
        print(f"error: resolutions must be >= 8 pixels, got {args.resolutions}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("work_dirs") / "robustness" / config.stem
    try:
        rows = evaluate_at_resolutions(config, checkpoint, args.resolutions, out, args.train_resolution,
                                       args.cfg_options, args.max_attention_gb)
    except ValueError as e:  # a config this tool cannot change the resolution of
        print(f"error: {e}", file=sys.stderr)
        return 2
    markdown, rows = report(rows, out, config.stem, args.metric)
    print(markdown)
    worst = [r for r in rows if r.get("within_limit") is not None]
    if worst:
        bad = max(worst, key=lambda r: r[f"{args.metric}_degradation_pct"])
        verdict = "meets" if all(r["within_limit"] for r in worst) else "misses"
        print(f"largest {args.metric} degradation: {bad[f'{args.metric}_degradation_pct']:.2f} % at "
              f"{bad['resolution']}x{bad['resolution']}: {verdict} the <= {DEGRADATION_LIMIT_PCT:g} % criterion")
    print(f"tables and plot: {out}/robustness.{{md,csv,png}}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
