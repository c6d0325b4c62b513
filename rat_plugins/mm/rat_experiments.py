"""RAT experiments on ISIC 2018 (mmseg): quick-mode overrides, resolution robustness, result tables.

Used by ``tools/evaluate_robustness.py`` and ``tools/run_rat_experiments.py``.

Robustness protocol. A model trained at ``R x R`` is evaluated with the test images resized to
``r x r`` for each requested ``r``; the backbone's pixel spacing becomes ``spacing * R / r`` so that
the image still spans the same physical extent (RAT's positional encoding works in physical
units). Masks are scored at their own size, as in training-time validation, so every resolution is
scored on the same pixels. Degradation of a metric ``m`` at ``r`` is
``100 * (m(R) - m(r)) / m(R)`` (positive: worse than at the training resolution).

Dense grouping attention holds a ``heads x groups x pixels`` matrix per image; at 1024 x 1024 a dense
block at stride 8 would need tens of GB. Resolutions whose largest dense matrix exceeds the memory
budget are reported as not run (with the block and the size), never attempted: train a model with
``attention='sparse'`` (``projects/RAT/configs/ablations/attn_sparse.py``) for those.
"""
import copy
import csv
import io
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mmengine.config import Config

from rat_plugins._atomic import atomic_write_text

__all__ = [
    "quick_overrides", "resize_transforms", "training_resolution", "set_eval_resolution",
    "dense_attention_gb", "evaluate_at_resolutions", "robustness_rows", "write_table",
    "plot_robustness", "METRICS", "DEGRADATION_LIMIT_PCT",
]

METRICS = ("Dice", "IoU", "Sensitivity", "Specificity", "Accuracy")
DEGRADATION_LIMIT_PCT = 10.0  # the seed study's success criterion


# ----------------------------------------------------------------------------- config surgery


def resize_transforms(pipeline) -> List[dict]:
    """The ``Resize`` steps of an mmseg pipeline (the ones that set the model's input size)."""
    return [t for t in pipeline if str(t.get("type", "")).split(".")[-1] == "Resize"]


def training_resolution(cfg: Config) -> int:
    """Side of the square training input: the train pipeline's ``Resize`` scale."""
    steps = resize_transforms(cfg.train_dataloader.dataset.pipeline)
    if len(steps) != 1 or steps[0].get("keep_ratio", False):
        raise ValueError(f"{cfg.filename}: expected one Resize(scale=(S, S), keep_ratio=False) in the training "
                         f"pipeline, found {steps}; give --train-resolution")
    w, h = steps[0]["scale"]
    if w != h:
        raise ValueError(f"{cfg.filename}: training Resize scale {steps[0]['scale']} is not square; "
                         f"give --train-resolution")
    return int(w)


def _scaled_width(width: int, factor: float) -> int:
    return max(8, int(round(width * factor)))


def quick_overrides(cfg: Config, work_dir, size: int = 64, iters: int = 60, width_factor: float = 0.25,
                    num_heads: int = 4, grouping_iters: int = 1, batch_size: int = 4,
                    val_interval: Optional[int] = None, seed: int = 0) -> Config:
    """Shrink a RAT ISIC config for a CPU run in seconds, keeping its own factor (scales, depth,
    attention kind, positional encoding, and the ratio of feature widths between the dims ablations).

    ``size``: square input (train and test); ``width_factor`` scales ``feature_dims`` and the head's
    channels; ``iters``: training iterations (cosine schedule shortened to match), validation every
    ``val_interval`` iterations (default: once, at the end) with the best-Dice checkpoint kept.
    """
    bb, head = cfg.model.backbone, cfg.model.decode_head
    bb.feature_dims = _scaled_width(bb.feature_dims, width_factor)
    bb.update(num_heads=num_heads, iters=grouping_iters)
    head.update(in_channels=[bb.feature_dims] * len(head.in_index),
                channels=_scaled_width(head.channels, width_factor), pool_scales=(1, 2))
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


def set_eval_resolution(cfg: Config, resolution: int, train_resolution: int) -> float:
    """Test at ``resolution x resolution`` with the spacing scaled to keep the physical extent.

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
    factor = train_resolution / resolution
    bb.spacing = [s * factor for s in base] if isinstance(base, (list, tuple)) else base * factor
    return bb.spacing if not isinstance(bb.spacing, list) else bb.spacing[0]


def dense_attention_gb(backbone_cfg, resolution: int, batch: int = 1) -> Dict[str, float]:
    """Size (GB, fp32) of the (heads x groups x pixels) matrix of every dense or multi-head
    attention block at a ``resolution``-pixel square input, keyed ``level<l>_block<b>``.

    Grids follow ``RATBackbone``: level ``l`` is ``ceil(R * scale_l)``, block ``b`` maps a grid
    ``n`` to ``ceil(n / stride)`` (odd kernel), the first block's input is the level itself.
    """
    from rat_plugins.models.rat_backbone import block_attention_kinds

    num_blocks = backbone_cfg.get("num_blocks", 4)
    stride = backbone_cfg.get("stride", 2)
    heads = backbone_cfg.get("num_heads", 8)
    attention = backbone_cfg.get("attention", "dense")
    kinds = ("mha",) * num_blocks if attention == "mha" else block_attention_kinds(attention, num_blocks)
    sizes = {}
    for level, scale in enumerate(backbone_cfg.get("scales", (1.0,))):
        scale = scale if isinstance(scale, (int, float)) else scale[0]
        n_in = math.ceil(resolution * scale - 1e-6)
        for block, kind in enumerate(kinds):
            n_out = math.ceil(n_in / stride)
            if kind != "local":
                sizes[f"level{level}_block{block}"] = batch * heads * (n_out ** 2) * (n_in ** 2) * 4 / 1e9
            n_in = n_out
    return sizes


# ----------------------------------------------------------------------------- evaluation


def _test_metrics(cfg: Config) -> Dict[str, float]:
    from rat_plugins.mm.runner import build_runner

    runner = build_runner(cfg)
    metrics = runner.test()
    return {k: float(v) for k, v in metrics.items()}


def evaluate_at_resolutions(config, checkpoint, resolutions: Sequence[int], work_dir,
                            train_resolution: Optional[int] = None, cfg_options: Optional[dict] = None,
                            max_attention_gb: float = 8.0, quick: Optional[dict] = None, log=print) -> List[dict]:
    """Evaluate one checkpoint at each resolution; one dict per resolution (``status`` 'ok' or the
    reason it was not run, the spacing, every metric the evaluator reports, seconds taken).

    ``quick``: keyword arguments of :func:`quick_overrides` (for checkpoints a quick run trained).
    The training resolution is always evaluated (degradation is measured against it).
    """
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    base = Config.fromfile(str(config))
    if quick is not None:
        quick_overrides(base, work_dir, **quick)
    if cfg_options:
        base.merge_from_dict(cfg_options)
    train_res = int(train_resolution or training_resolution(base))
    wanted = sorted({int(r) for r in resolutions} | {train_res})
    rows = []
    for res in wanted:
        cfg = copy.deepcopy(base)
        spacing = set_eval_resolution(cfg, res, train_res)
        cfg.load_from = str(checkpoint)
        cfg.work_dir = str(Path(work_dir) / f"res_{res}")
        # unique per evaluation: mmengine keys its logger and visualizer instances by this name
        cfg.experiment_name = f"robustness_{res}_{time.time_ns()}"
        cfg.test_dataloader.update(num_workers=0, persistent_workers=False)
        row = {"resolution": res, "train_resolution": train_res, "spacing": spacing}
        dense = dense_attention_gb(cfg.model.backbone, res, cfg.test_dataloader.get("batch_size", 1))
        too_big = {k: v for k, v in dense.items() if v > max_attention_gb}
        if too_big:
            block, gb = max(too_big.items(), key=lambda kv: kv[1])
            row["status"] = (f"not run: dense attention of {block} needs {gb:.1f} GB at {res}x{res} "
                             f"(budget {max_attention_gb:g} GB); train with attention='sparse'")
            log(f"[robustness] {res}x{res}: {row['status']}")
            rows.append(row)
            continue
        log(f"[robustness] {res}x{res} (spacing {spacing:g})")
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


def _fmt(value) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def write_table(rows: List[dict], columns: Sequence[str], md_path, csv_path, title: str = "") -> str:
    """Markdown and CSV of ``rows`` (missing cells blank, never zero); returns the Markdown."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: r.get(c, "") for c in columns})
    atomic_write_text(md_path, markdown)
    atomic_write_text(csv_path, buf.getvalue())
    return markdown


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
            ax.axhspan(ref[metric] * (1 - DEGRADATION_LIMIT_PCT / 100), ref[metric], color=line.get_color(),
                       alpha=0.08)
            ax.plot([ref["resolution"]], [ref[metric]], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test resolution (pixels per side; star: training resolution)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"Resolution robustness (band: <= {DEGRADATION_LIMIT_PCT:g} % below training)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=png_path.parent, prefix=f".{png_path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, png_path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
