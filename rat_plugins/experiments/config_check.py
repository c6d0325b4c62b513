"""Check an mmseg config before training: model, parameter counts, one forward pass, weights, data.

The data of every loader is built and checked as training would check it
(:func:`rat_plugins.mm.datasets.check_config_dataset`: files exist and decode, masks of their
image's size, classes against the model's ``num_classes``). Each problem is one ``MISSING:``
line; :func:`main` returns 1 when something is missing or fails, 2 for a config error, else 0.
"""

import argparse
import os
import sys
import time
from types import SimpleNamespace

__all__ = ["main", "parameter_counts", "weight_files", "input_size"]

DATA_HINT = (
    "create it from raw DRIVE with tools/convert_drive.py, or a synthetic stand-in with "
    "`python -m rat_plugins.data.synthetic fundus --out <folder> --layout mmseg`"
)
# dataset type -> where its data comes from (DATA_HINT for the others)
DATA_HINTS = {
    "ISIC2018Dataset": "download ISIC 2018 Task 1 (docs/formats.md, ISIC 2018 Task 1), or a synthetic stand-in with "
    "`python -m rat_plugins.data.synthetic isic --out <folder>`",
}
LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")


def _parser():
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("config")
    p.add_argument("--cfg-options", nargs="+", action=DictAction, help="override settings, key=value")
    p.add_argument(
        "--data-check",
        choices=("header", "full"),
        default=None,
        help="header: every file opens and is complete (default, $RAT_DATA_CHECK); full: decode every image and mask",
    )
    return p


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k" if n else "0"


def parameter_counts(module):
    """``(total, trainable, frozen)`` parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable, total - trainable


def weight_files(cfg):
    """(config field, path) of every weights file the config points at."""
    out = []
    bb = cfg.model.get("backbone", {})
    if bb.get("pretrained_timm"):
        out.append(("model.backbone.pretrained_timm", bb["pretrained_timm"]))
    for where, node in (("model", cfg.model), ("model.backbone", bb)):
        init = node.get("init_cfg")
        if isinstance(init, dict) and init.get("checkpoint"):
            out.append((f"{where}.init_cfg.checkpoint", init["checkpoint"]))
        if isinstance(node.get("pretrained"), str):
            out.append((f"{where}.pretrained", node["pretrained"]))
    if cfg.get("load_from"):
        out.append(("load_from", cfg.load_from))
    return out


def _innermost_dataset(ds):
    while isinstance(ds, dict) and "dataset" in ds and "data_prefix" not in ds:
        ds = ds["dataset"]
    return ds


def _data_summary(result: dict) -> str:
    if result["masks"]:
        return f"{result['images']} images, {result['masks']} annotations"
    return f"{result['images']} images" if result["images"] else f"{result['samples']} samples"


def check_data(cfg, missing, lines, mode=None):
    """Every loader's folders exist; then its dataset is built and checked (files, masks, classes)."""
    from rat_plugins.data.validate import DataError
    from rat_plugins.mm.datasets import check_config_dataset

    reported = set()
    results = []  # (dataset entry, summary or error), so that val = test is checked once
    for loader in LOADERS:
        if not cfg.get(loader):
            continue
        ds = _innermost_dataset(cfg[loader].get("dataset", {}))
        root = ds.get("data_root", "") or ""
        prefix = ds.get("data_prefix", {}) or {}
        img_suffix = ds.get("img_suffix", ".png")
        seg_suffix = ds.get("seg_map_suffix", "_manual1.png" if ds.get("type") == "DRIVEDataset" else ".png")
        name = loader.replace("_dataloader", "")
        ok = True
        for key, suffix in (("img_path", img_suffix), ("seg_map_path", seg_suffix)):
            if key not in prefix:
                continue
            folder = os.path.join(root, prefix[key])
            if not os.path.isdir(folder):
                if folder not in reported:
                    missing.append(f"{name} data: folder {folder} does not exist ({loader}.dataset.data_prefix.{key})")
                reported.add(folder)
                ok = False
                continue
            if not any(f.endswith(suffix) for f in os.listdir(folder)):
                if folder not in reported:
                    missing.append(f"{name} data: no *{suffix} files in {folder}")
                reported.add(folder)
                ok = False
        if not ok:
            continue
        entry = cfg[loader].get("dataset")
        result = next((r for e, r in results if e == entry), None)
        if result is None:
            try:
                result = check_config_dataset(cfg, loader, mode)
            except DataError as e:
                result = e
            except Exception as e:  # noqa: BLE001  (report any build failure as one line)
                result = DataError(f"{loader}.dataset cannot be built: {type(e).__name__}: {e}")
            results.append((entry, result))
        if isinstance(result, DataError):
            if str(result) not in reported:
                missing.append(f"{name} data: {result}")
            reported.add(str(result))
        else:
            lines.append(f"data {name}: ok, {_data_summary(result)} under {root}")


def input_size(cfg):
    """The (height, width) the model is fed: preprocessor size, crop size or backbone image size."""
    for size in (
        cfg.model.get("data_preprocessor", {}).get("size"),
        cfg.get("crop_size"),
        cfg.model.get("backbone", {}).get("img_size"),
    ):
        if size:
            return (size, size) if isinstance(size, int) else tuple(size)
    return (224, 224)


def check_model(cfg, absent, missing, lines):
    """Build the model, load its encoder weights when present, count parameters, run one forward pass."""
    import torch
    from mmseg.registry import MODELS

    try:
        model = MODELS.build(cfg.model)
    except Exception as e:  # noqa: BLE001  (report any build failure as one line)
        missing.append(f"model: cannot be built: {type(e).__name__}: {e}")
        return
    backbone = getattr(model, "backbone", None)
    if getattr(backbone, "pretrained_timm", None) and "model.backbone.pretrained_timm" not in absent:
        try:
            backbone.init_weights()  # converts and loads the encoder weights; the report is logged
            lines.append("weights: model.backbone.pretrained_timm converted and loaded")
        except Exception as e:  # noqa: BLE001
            missing.append(f"weights: cannot be loaded: {type(e).__name__}: {e}")
    elif getattr(backbone, "pretrained_timm", None):
        lines.append("weights: not loaded (file missing); forward pass with random weights")
    total, trainable, frozen = parameter_counts(model)
    lines.append(
        f"parameters: total {_fmt(total)} ({total}), trainable {_fmt(trainable)} ({trainable}), "
        f"frozen {_fmt(frozen)} ({frozen})"
    )
    for name, child in model.named_children():
        t, tr, fr = parameter_counts(child)
        if t:
            lines.append(
                f"  {name:<12} {type(child).__name__:<26} total {_fmt(t):>9}  trainable {_fmt(tr):>9}"
                f"  frozen {_fmt(fr):>9}"
            )
    h, w = input_size(cfg)
    model.eval()
    try:
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(torch.zeros(1, 3, h, w), mode="tensor")
        dt = time.perf_counter() - start
        stride = h / logits.shape[-2] if logits.shape[-2] else float("nan")
        lines.append(
            f"forward: input 1x3x{h}x{w} -> logits {'x'.join(map(str, logits.shape))} "
            f"(decode head stride {stride:g}) in {dt:.2f} s"
        )
    except Exception as e:  # noqa: BLE001
        missing.append(f"forward: failed at 1x3x{h}x{w}: {type(e).__name__}: {e}")


def main(argv=None) -> int:
    """``tools/check_config.py``."""
    from mmengine.registry import DefaultScope
    from mmengine.utils import import_modules_from_strings

    import rat_plugins.mm  # noqa: F401  (registers the plugin's components)
    from rat_plugins.mm.runner import ConfigError, load_config

    args = _parser().parse_args(argv)
    try:
        cfg = load_config(
            SimpleNamespace(config=args.config, cfg_options=args.cfg_options, work_dir=None, launcher="none")
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.get("custom_imports"):
        import_modules_from_strings(**cfg.custom_imports)
    DefaultScope.get_instance(f"check_config-{time.time()}", scope_name=cfg.get("default_scope", "mmseg"))

    missing, lines = [], [f"config: {args.config}"]
    files = weight_files(cfg)
    absent = {field for field, path in files if not os.path.isfile(path)}
    for field, path in files:
        if field in absent:
            missing.append(f"weights: {path} ({field}) not found (relative paths start at {os.getcwd()})")
        else:
            lines.append(f"weights: {field} = {path}: found")
    check_model(cfg, absent, missing, lines)
    check_data(cfg, missing, lines, args.data_check)
    for line in lines:
        print(line)
    for line in missing:
        print(f"MISSING: {line}")
    if any(" data: " in line for line in missing):
        dataset_type = _innermost_dataset(cfg.get("train_dataloader", {}).get("dataset", {})).get("type")
        print(f"hint: {DATA_HINTS.get(dataset_type, DATA_HINT)}")
    print("result: " + (f"{len(missing)} problem(s)" if missing else "ok"))
    return 1 if missing else 0
