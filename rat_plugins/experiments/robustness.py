"""Resolution robustness of a trained RAT segmentation model (the RAT study, ISIC 2018, mmseg).

A model trained at ``R x R`` is tested with the images resized to ``r x r`` and the backbone's
pixel spacing scaled by ``R / r``, so the image spans the same physical extent (RAT's positional
encoding works in physical units); masks are scored at their own size. Degradation of a metric is
``100 * (m(R) - m(r)) / m(R)``. Resolutions whose test forward would hold more tensors than a
memory budget (:func:`estimate_eval_memory_gb`) are reported as not run, never attempted.
"""

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from rat_plugins.utils.atomic import atomic_path

from .tables import write_table

__all__ = [
    "METRICS",
    "DEGRADATION_LIMIT_PCT",
    "resize_transforms",
    "training_resolution",
    "set_eval_resolution",
    "build_segmentor",
    "estimate_eval_memory_gb",
    "evaluate_at_resolutions",
    "robustness_rows",
    "plot_robustness",
    "report",
    "main",
]

METRICS = ("Dice", "IoU", "Sensitivity", "Specificity", "Accuracy")
DEGRADATION_LIMIT_PCT = 10.0  # the RAT study's success criterion
TABLE_COLUMNS = [
    "resolution",
    "spacing",
    "status",
    *METRICS,
    "{metric}_degradation_pct",
    "within_limit",
    "seconds",
    "memory_gb",
]


# ----------------------------------------------------------------------------- config surgery
def resize_transforms(pipeline) -> List[dict]:
    """The ``Resize`` steps of an mmseg pipeline (the ones that set the model's input size)."""
    return [t for t in pipeline if str(t.get("type", "")).split(".")[-1] == "Resize"]


def training_resolution(cfg) -> int:
    """Side of the square training input: the train pipeline's ``Resize`` scale."""
    steps = resize_transforms(cfg.train_dataloader.dataset.pipeline)
    if len(steps) != 1 or steps[0].get("keep_ratio", False):
        raise ValueError(
            f"{cfg.filename}: expected one Resize(scale=(S, S), keep_ratio=False) in the training "
            f"pipeline, found {steps}; give --train-resolution"
        )
    w, h = steps[0]["scale"]
    if w != h:
        raise ValueError(
            f"{cfg.filename}: training Resize scale {steps[0]['scale']} is not square; give --train-resolution"
        )
    return int(w)


def set_eval_resolution(cfg, resolution: int, train_resolution: int, scale_spacing: bool = True) -> float:
    """Test at ``resolution x resolution`` with the spacing scaled to keep the physical extent
    (``scale_spacing=False``: the training spacing kept, the control that shows what scaling does).

    Returns the backbone spacing used (scale-1 image).
    """
    steps = resize_transforms(cfg.test_dataloader.dataset.pipeline)
    if not steps:
        raise ValueError(f"{cfg.filename}: the test pipeline has no Resize step to change the resolution")
    for step in steps:
        step.update(scale=(resolution, resolution), keep_ratio=False)
    cfg.model.data_preprocessor.size = (resolution, resolution)
    bb = cfg.model.backbone
    base = bb.get("spacing") or 1.0
    factor = train_resolution / resolution if scale_spacing else 1.0
    bb.spacing = [s * factor for s in base] if isinstance(base, (list, tuple)) else base * factor
    return bb.spacing if not isinstance(bb.spacing, list) else bb.spacing[0]


def build_segmentor(model_cfg):
    """The mmseg model of a config's ``model`` (random weights), whatever the default scope."""
    import mmseg.models  # noqa: F401  (registers mmseg's models)
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    with DefaultScope.overwrite_default_scope("mmseg"):
        return MODELS.build(copy.deepcopy(model_cfg))


def estimate_eval_memory_gb(model_cfg, resolution: int, batch: int = 1, probes: Sequence[int] = (128, 256)) -> float:
    """GB of tensors one test forward of the model (backbone and head, ``batch`` images of
    ``resolution x resolution``) holds at its peak: measured, not modelled, and an upper bound.

    The config's model (random weights) runs under
    :class:`~rat_plugins.utils.live_memory.LiveTensorBytes`. At or below the larger probe the size
    itself is measured. Above it: every tensor the model holds grows with the pixel count, except
    the fixed-size blocks of its chunked attention (no tokens x tokens matrix anywhere). So the
    two probes run with tiny chunks and give ``a + b * pixels``, and the chunks' own share (the
    larger probe with its real chunks minus with tiny ones, already at full size there) is added.
    """
    import torch

    from rat_plugins.utils.live_memory import LiveTensorBytes

    model = build_segmentor(model_cfg).eval()
    chunked = [m for m in model.modules() if hasattr(m, "chunk_elements")]
    real_chunks = [m.chunk_elements for m in chunked]

    def peak_bytes(size: int, tiny_chunks: bool = False) -> float:
        for module, chunk in zip(chunked, real_chunks):
            module.chunk_elements = 2**16 if tiny_chunks else chunk
        images = torch.zeros(1, model_cfg.backbone.get("input_features", 3), size, size)
        try:
            with torch.no_grad(), LiveTensorBytes() as memory:
                model(images, mode="tensor")
        finally:
            for module, chunk in zip(chunked, real_chunks):
                module.chunk_elements = chunk
        return float(memory.peak)

    small, large = sorted(int(p) for p in probes)
    if resolution <= large:
        return batch * peak_bytes(resolution) / 1e9
    low, high = peak_bytes(small, tiny_chunks=True), peak_bytes(large, tiny_chunks=True)
    chunks = max(0.0, peak_bytes(large) - high)
    per_pixel = (high - low) / (large**2 - small**2)
    return batch * (high + per_pixel * (resolution**2 - large**2) + chunks) / 1e9


# ----------------------------------------------------------------------------- evaluation
def _test_metrics(cfg) -> Dict[str, float]:
    from rat_plugins.mm.runner import build_runner

    metrics = build_runner(cfg).test()
    return {k: float(v) for k, v in metrics.items()}


def evaluate_at_resolutions(
    config,
    checkpoint,
    resolutions: Sequence[int],
    work_dir,
    train_resolution: Optional[int] = None,
    cfg_options: Optional[dict] = None,
    max_memory_gb: float = 8.0,
    with_training_resolution: bool = True,
    scale_spacing: bool = True,
) -> List[dict]:
    """Evaluate one checkpoint at each resolution; one dict per resolution (``status`` 'ok' or the
    reason it was not run, the spacing, every metric the evaluator reports, seconds taken).

    The training resolution is evaluated too (degradation is measured against it), unless
    ``with_training_resolution`` is False (a caller that spreads the resolutions over workers).
    ``scale_spacing=False`` keeps the training spacing at every resolution (a control).
    """
    from mmengine.config import Config

    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    base = Config.fromfile(str(config))
    if cfg_options:
        base.merge_from_dict(cfg_options)
    train_res = int(train_resolution or training_resolution(base))
    rows = []
    for res in sorted({int(r) for r in resolutions} | ({train_res} if with_training_resolution else set())):
        cfg = copy.deepcopy(base)
        spacing = set_eval_resolution(cfg, res, train_res, scale_spacing)
        cfg.load_from = str(checkpoint)
        cfg.work_dir = str(Path(work_dir) / (f"res_{res}" if scale_spacing else f"res_{res}_unscaled"))
        # unique per evaluation: mmengine keys its logger and visualizer instances by this name
        cfg.experiment_name = f"robustness_{res}_{time.time_ns()}"
        cfg.test_dataloader.update(num_workers=0, persistent_workers=False)
        row = {"resolution": res, "train_resolution": train_res, "spacing": spacing}
        row["memory_gb"] = round(estimate_eval_memory_gb(cfg.model, res, cfg.test_dataloader.get("batch_size", 1)), 3)
        if row["memory_gb"] > max_memory_gb:
            row["status"] = (
                f"not run: a test forward at {res}x{res} holds about {row['memory_gb']:.1f} GB of tensors "
                f"(budget {max_memory_gb:g} GB, --max-memory-gb)"
            )
            print(f"[robustness] {res}x{res}: {row['status']}")
            rows.append(row)
            continue
        print(f"[robustness] {res}x{res} (spacing {spacing:g}, about {row['memory_gb']:.2f} GB of tensors)")
        start = time.perf_counter()
        row.update(_test_metrics(cfg))
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["status"] = "ok"
        rows.append(row)
    return rows


def robustness_rows(rows: List[dict], metric: str = "Dice") -> List[dict]:
    """Add ``<m>_degradation_pct`` for every metric and ``within_limit`` for ``metric``."""
    ref = next((r for r in rows if r["resolution"] == r["train_resolution"] and r["status"] == "ok"), None)
    out = []
    for row in rows:
        row = dict(row)
        if ref is not None and row["status"] == "ok":
            for m in METRICS:
                if m in row and m in ref and ref[m]:
                    row[f"{m}_degradation_pct"] = round(100.0 * (ref[m] - row[m]) / ref[m], 2)
            if f"{metric}_degradation_pct" in row:
                row["within_limit"] = row[f"{metric}_degradation_pct"] <= DEGRADATION_LIMIT_PCT
        out.append(row)
    return out


def plot_robustness(series: Dict[str, List[dict]], png_path, metric: str = "Dice") -> None:
    """``metric`` against resolution, one line per model; the training resolution is marked and the
    band of at most ``DEGRADATION_LIMIT_PCT`` % degradation below its value shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in series.items():
        ok = [r for r in rows if r["status"] == "ok" and metric in r]
        if not ok:
            continue
        xs, ys = [r["resolution"] for r in ok], [r[metric] for r in ok]
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        ref = next((r for r in ok if r["resolution"] == r["train_resolution"]), None)
        if ref is not None:
            ax.axhspan(ref[metric] * (1 - DEGRADATION_LIMIT_PCT / 100), ref[metric], color=line.get_color(), alpha=0.08)
            ax.plot([ref["resolution"]], [ref[metric]], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test resolution (pixels per side; star: training resolution)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"Resolution robustness (band: <= {DEGRADATION_LIMIT_PCT:g} % below training)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(png_path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def report(rows, out: Path, name: str, metric: str):
    """Write the table and plot; returns the Markdown and the rows with degradations."""
    rows = robustness_rows(rows, metric)
    columns = [c.format(metric=metric) for c in TABLE_COLUMNS]
    markdown = write_table(
        rows, columns, out / "robustness.md", out / "robustness.csv", title=f"Resolution robustness: {name}"
    )
    plot_robustness({name: rows}, out / "robustness.png", metric)
    return markdown, rows


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description="Evaluate one trained RAT segmentation model at several input resolutions.")
    p.add_argument("--config", required=True, help="mmseg config of the trained model")
    p.add_argument("--checkpoint", required=True, help="checkpoint (.pth) of that model")
    p.add_argument("--resolutions", type=int, nargs="+", required=True, help="square test sizes in pixels")
    p.add_argument("--train-resolution", type=int, help="default: the training pipeline's Resize scale")
    p.add_argument("--metric", default="Dice", choices=METRICS, help="metric judged against the 10 %% limit")
    p.add_argument("--out", help="output folder (default work_dirs/robustness/<config name>)")
    p.add_argument(
        "--max-memory-gb",
        type=float,
        default=8.0,
        help="skip resolutions whose test forward would hold more tensors than this (GB)",
    )
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="config overrides, key=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """``tools/evaluate_robustness.py``: 1 when some resolution could not be evaluated, 2 for bad arguments."""
    import rat_plugins.mm  # noqa: F401  (registers the plugin's components)

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
        rows = evaluate_at_resolutions(
            config, checkpoint, args.resolutions, out, args.train_resolution, args.cfg_options, args.max_memory_gb
        )
    except ValueError as e:  # a config this tool cannot change the resolution of
        print(f"error: {e}", file=sys.stderr)
        return 2
    return print_report(rows, out, config.stem, args.metric)


def print_report(rows, out: Path, name: str, metric: str) -> int:
    """Write and print the table, the verdict on the criterion; 1 when some resolution was not evaluated."""
    markdown, rows = report(rows, out, name, metric)
    print(markdown)
    judged = [r for r in rows if r.get("within_limit") is not None]
    if judged:
        worst = max(judged, key=lambda r: r[f"{metric}_degradation_pct"])
        verdict = "meets" if all(r["within_limit"] for r in judged) else "misses"
        print(
            f"largest {metric} degradation: {worst[f'{metric}_degradation_pct']:.2f} % at "
            f"{worst['resolution']}x{worst['resolution']}: {verdict} the <= {DEGRADATION_LIMIT_PCT:g} % criterion"
        )
    print(f"tables and plot: {out}/robustness.{{md,csv,png}}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0
