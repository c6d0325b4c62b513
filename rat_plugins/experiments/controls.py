"""Positive controls of the RAT study: tasks whose answer is known by construction, run through the
study's own pipeline (configs, ISIC-layout data, mmseg runner, best checkpoint, test metrics).

Context control: ``projects/RAT/configs/controls/context_{single,triple}_64.py`` on
:func:`~rat_plugins.data.synthetic.isic.make_isic_context` data, where a lesion counts only when the
image is dark around it from 18+ pixels beyond its edge. Attention is local at every level, so the
single-scale model cannot see the surround and the triple-scale one can through its coarse levels:
the triple-scale model should win, by more than the spread over seeds::

    python tools/run_rat_controls.py [context] [spacing] [--seeds 0 1 2] [--iters N] [--work-dir DIR]

Physical-units control: ``projects/RAT/configs/controls/radius_single_64.py`` on
:func:`~rat_plugins.data.synthetic.isic.make_isic_radius` data (the mask is a disc of fixed radius
around a marker; only the multi-resolution attention, whose RoSE positions are index x spacing,
reaches its edge). Trained at 64x64 and tested at 128x128 as the robustness tool does (spacing
halved), it should stay within the study's 10 % criterion, and tested with the spacing kept degrade
more.

Writes ``<work dir>/context_control.{md,csv}`` (test Dice per seed, mean and standard deviation per
model, the gap), ``spacing_control.{md,csv}`` (degradation per seed, scaled and kept) and
``controls.json`` (both verdicts). Exit code 1 when a control fails.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, Sequence

from rat_plugins.utils.atomic import atomic_write_text

from .rat_study import CONFIGS, train_and_test
from .robustness import DEGRADATION_LIMIT_PCT, evaluate_at_resolutions, robustness_rows
from .tables import write_table

__all__ = [
    "CONTEXT_CONFIGS",
    "CONTEXT_DATA",
    "RADIUS_CONFIG",
    "RADIUS_DATA",
    "context_verdict",
    "spacing_verdict",
    "run_context_control",
    "run_spacing_control",
    "main",
]

CONTEXT_CONFIGS = {
    "single": CONFIGS / "controls" / "context_single_64.py",
    "triple": CONFIGS / "controls" / "context_triple_64.py",
}
CONTEXT_DATA = dict(n=64, seed=0, size=64)
RADIUS_CONFIG = CONFIGS / "controls" / "radius_single_64.py"
RADIUS_DATA = dict(n=64, seed=0, size=64)
DEFAULT_ITERS = {"context": 100, "spacing": 200}  # what tests/test_rat_controls.py checks


def prepare_data(work_dir: Path, task: str) -> Path:
    """The ``task`` set (``context`` or ``radius``) under ``<work_dir>/datasets_<task>/isic2018``
    (written once), made the dataset root for the configs loaded next."""
    from rat_plugins.data.synthetic import make_isic_context, make_isic_radius

    make, settings = {"context": (make_isic_context, CONTEXT_DATA), "radius": (make_isic_radius, RADIUS_DATA)}[task]
    root = work_dir / f"datasets_{task}"
    if not (root / "isic2018").is_dir():
        print(f"[controls] writing the {task} task to {root / 'isic2018'}")
        make(root / "isic2018", **settings)
    os.environ["RAT_DATASETS"] = str(root.resolve())
    return root


def _train_and_test(config: Path, seed: int, iters: int, size: int, work_dir: Path, force: bool) -> dict:
    """One control run through the study's own train-and-test step (best checkpoint, test metrics)."""
    args = argparse.Namespace(
        work_dir=str(work_dir),
        force=force,
        quick=True,
        iters=iters,
        seed=seed,
        cfg_options=None,
        # the control configs are small already: only the size, loaders and schedule change; batches
        # of 8 (steadier than 4 in runs this short), the best of five validations kept
        quick_kwargs=dict(
            size=size,
            width_factor=1.0,
            num_heads=4,
            grouping_iters=1,
            batch_size=8,
            val_interval=max(1, iters // 5),
        ),
    )
    return train_and_test(config, f"controls/seed{seed}", args)


def context_verdict(dice: Dict[str, Sequence[float]]) -> dict:
    """Mean and sample standard deviation per model, the gap (triple - single) and whether it
    exceeds the spread (the two standard deviations added)."""
    summary = {}
    for name, values in dice.items():
        values = [float(v) for v in values]
        summary[name] = dict(
            dice=values,
            mean=statistics.fmean(values),
            std=statistics.stdev(values) if len(values) > 1 else 0.0,
        )
    gap = summary["triple"]["mean"] - summary["single"]["mean"]
    spread = summary["triple"]["std"] + summary["single"]["std"]
    summary.update(gap=gap, spread=spread, passed=bool(gap > spread and len(dice["triple"]) >= 3))
    return summary


def run_context_control(
    work_dir, seeds: Sequence[int] = (0, 1, 2), iters: int = DEFAULT_ITERS["context"], force: bool = False
) -> dict:
    """Train and test both context configs at every seed; write ``context_control.{md,csv}`` and
    return the verdict."""
    work_dir = Path(work_dir)
    prepare_data(work_dir, "context")
    dice = {name: [] for name in CONTEXT_CONFIGS}
    rows = []
    for seed in seeds:
        for name, config in CONTEXT_CONFIGS.items():
            result = _train_and_test(config, seed, iters, CONTEXT_DATA["size"], work_dir / "context", force)
            dice[name].append(result["Dice"])
            rows.append({"model": name, "seed": seed, "Dice": result["Dice"], "IoU": result["IoU"]})
    summary = context_verdict(dice)
    for name in CONTEXT_CONFIGS:
        part = summary[name]
        rows.append({"model": name, "seed": "mean ± std", "Dice": f"{part['mean']:.2f} ± {part['std']:.2f}"})
    title = (
        f"Context control ({len(seeds)} seeds, {iters} iterations): triple - single = {summary['gap']:.2f} Dice, "
        f"spread {summary['spread']:.2f}: {'PASS' if summary['passed'] else 'FAIL'}"
    )
    columns = ["model", "seed", "Dice", "IoU"]
    print(write_table(rows, columns, work_dir / "context_control.md", work_dir / "context_control.csv", title=title))
    return summary


def spacing_verdict(rows: Sequence[dict]) -> dict:
    """Mean Dice degradation at the doubled resolution with the spacing scaled and kept; passed when
    the scaled one meets the study's criterion and the kept one degrades more than that."""
    summary = {}
    for key, scaled in (("scaled", True), ("kept", False)):
        values = [r["Dice_degradation_pct"] for r in rows if r["spacing_scaled"] is scaled]
        summary[key] = dict(degradation_pct=values, mean=statistics.fmean(values))
    scaled, kept = summary["scaled"]["mean"], summary["kept"]["mean"]
    summary["passed"] = bool(scaled <= DEGRADATION_LIMIT_PCT < kept)
    return summary


def run_spacing_control(
    work_dir, seeds: Sequence[int] = (0, 1, 2), iters: int = DEFAULT_ITERS["spacing"], force: bool = False
) -> dict:
    """Train the radius config at every seed, test it at twice the resolution with the spacing scaled
    and kept; write ``spacing_control.{md,csv}`` and return the verdict."""
    work_dir = Path(work_dir)
    prepare_data(work_dir, "radius")
    size = RADIUS_DATA["size"]
    rows = []
    for seed in seeds:
        result = _train_and_test(RADIUS_CONFIG, seed, iters, size, work_dir / "radius", force)
        out = work_dir / "radius" / f"controls/seed{seed}" / RADIUS_CONFIG.stem / "robustness"
        for scaled in (True, False):
            evaluated = evaluate_at_resolutions(
                result["run_config"], result["checkpoint"], [2 * size], out, scale_spacing=scaled
            )
            for row in robustness_rows(evaluated):
                if row["resolution"] == 2 * size:
                    rows.append({"seed": seed, "spacing_scaled": scaled, "train_Dice": result["Dice"], **row})
    summary = spacing_verdict(rows)
    title = (
        f"Physical-units control ({len(seeds)} seeds, {iters} iterations, trained at {size}, tested at {2 * size}): "
        f"Dice degradation {summary['scaled']['mean']:.1f} % with the spacing scaled, "
        f"{summary['kept']['mean']:.1f} % with it kept: {'PASS' if summary['passed'] else 'FAIL'}"
    )
    columns = ["seed", "resolution", "spacing_scaled", "spacing", "train_Dice", "Dice", "Dice_degradation_pct"]
    print(write_table(rows, columns, work_dir / "spacing_control.md", work_dir / "spacing_control.csv", title=title))
    return summary


def main(argv=None) -> int:
    """``tools/run_rat_controls.py``: 1 when a control fails (its effect was not recovered)."""
    import rat_plugins.mm  # noqa: F401  (registers the plugin's components)

    p = argparse.ArgumentParser(description="The RAT study's positive controls (known answers).")
    p.add_argument("controls", nargs="*", metavar="{context,spacing}", help="which controls (default: both)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--iters", type=int, help="training iterations per run (default: context 100, spacing 200, as the tests check)"
    )
    p.add_argument("--work-dir", default="work_dirs/rat_controls")
    p.add_argument("--force", action="store_true", help="rerun runs that already have a result.json")
    args = p.parse_args(argv)
    args.controls = args.controls or ["context", "spacing"]
    unknown = sorted(set(args.controls) - {"context", "spacing"})
    if unknown:
        print(f"error: unknown controls {unknown}; choose from context, spacing", file=sys.stderr)
        return 2
    if len(args.seeds) < 3:
        print("error: --seeds needs at least 3 seeds (mean and spread)", file=sys.stderr)
        return 2
    run = {"context": run_context_control, "spacing": run_spacing_control}
    iters = {name: args.iters or DEFAULT_ITERS[name] for name in args.controls}
    summaries = {name: run[name](args.work_dir, args.seeds, iters[name], args.force) for name in args.controls}
    record = {"iters": iters, "seeds": args.seeds, **summaries}
    atomic_write_text(Path(args.work_dir) / "controls.json", json.dumps(record, indent=2))
    failed = [name for name, summary in summaries.items() if not summary["passed"]]
    print(f"controls: {', '.join(f'{n} ' + ('FAIL' if n in failed else 'PASS') for n in summaries)}")
    return 1 if failed else 0
