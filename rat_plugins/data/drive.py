"""Raw DRIVE -> the layout mmseg's ``DRIVEDataset`` reads (numpy + Pillow only, no framework).

Reads the DRIVE download (a folder, or ``training.zip`` / ``test.zip`` / ``DRIVE.zip``; a single
top folder such as ``DRIVE/`` is looked through) and writes what mmseg's
``tools/dataset_converters/drive.py`` writes: ``training`` -> ``images/training/21.png`` +
``annotations/training/21_manual1.png`` (0 / 1, thresholded at 128), ``test`` -> ``validation``,
with the second observer as ``*_manual2.png``. Both layouts: docs/formats.md, DRIVE / fundus.
With ``fov_ignore=True`` pixels outside the field of view become 255 (mmseg's ``ignore_index``),
so loss and metrics count only the field of view, as the DRIVE protocol does. Every input file is
checked before anything is written; writes are atomic.

    python tools/convert_drive.py path/to/DRIVE [--out datasets/fundus/drive_mmseg] [--fov-ignore] [--overwrite]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..utils.atomic import atomic_write_bytes
from .paths import dataset_root

__all__ = ["convert_drive", "find_drive_root", "DriveLayoutError", "main", "SPLITS", "IGNORE_INDEX"]

SPLITS = {"training": "training", "test": "validation"}  # raw split -> mmseg split
IGNORE_INDEX = 255
_IMAGE_RE = re.compile(r"^(\d+)_(training|test)\.tiff?$", re.IGNORECASE)
_OWNED = ("images", "annotations")


class DriveLayoutError(ValueError):
    """The input is not (or not completely) in the raw DRIVE layout."""


def _write_png(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB" if arr.ndim == 3 else "L").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _read_binary(path: Path) -> np.ndarray:
    """A DRIVE GIF (palette or greyscale) -> bool, ``value >= 128`` as mmseg's converter."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) >= 128


def find_drive_root(folder: Union[str, os.PathLike]) -> Path:
    """The folder that holds ``training/`` and/or ``test/`` (``folder`` or a single subfolder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DriveLayoutError(f"DRIVE folder not found: '{folder}'")
    candidates = [folder] + sorted(p for p in folder.iterdir() if p.is_dir())
    for c in candidates:
        if any((c / s / "images").is_dir() for s in SPLITS):
            return c
    raise DriveLayoutError(
        f"'{folder}' is not a raw DRIVE folder: expected training/images/ or test/images/ "
        "in it or in one of its subfolders"
    )


def _size(path: Path):
    with Image.open(path) as im:
        return im.size  # (w, h), header only


def _plan_split(root: Path, split: str, fov_ignore: bool):
    """Check every file of a split (image headers only); the list of what to write."""
    src = root / split
    images = sorted(p for p in (src / "images").iterdir() if _IMAGE_RE.match(p.name))
    if not images:
        raise DriveLayoutError(f"no images named NN_{split}.tif in '{src / 'images'}'")
    has_manual = (src / "1st_manual").is_dir()
    if split == "training" and not has_manual:
        raise DriveLayoutError(f"'{src / '1st_manual'}' is missing: training images need their annotations")
    problems: List[str] = []
    plan = []
    for img_path in images:
        idx = _IMAGE_RE.match(img_path.name).group(1)
        size = _size(img_path)
        fov_path = src / "mask" / f"{idx}_{split}_mask.gif"
        if not fov_path.is_file():
            fov_path = None
            if fov_ignore:
                problems.append(
                    f"{src / 'mask' / f'{idx}_{split}_mask.gif'}: field-of-view mask missing (needed by fov_ignore)"
                )
        labels = {}
        for folder, suffix in (("1st_manual", "manual1"), ("2nd_manual", "manual2")):
            p = src / folder / f"{idx}_{suffix}.gif"
            if p.is_file():
                labels[suffix] = p
            elif folder == "1st_manual" and has_manual:
                problems.append(f"{p}: annotation missing for {img_path.name}")
        for p in [fov_path, *labels.values()]:
            if p is not None and _size(p) != size:
                problems.append(f"{p}: size {'x'.join(map(str, _size(p)))} != image {size[0]}x{size[1]}")
        plan.append((idx, img_path, fov_path, labels))
    if problems:
        raise DriveLayoutError(f"{split}: {len(problems)} problem(s), nothing written:\n  " + "\n  ".join(problems))
    return plan, has_manual


def _write_split(split: str, plan, has_manual: bool, out: Path, fov_ignore: bool) -> dict:
    mm = SPLITS[split]
    stats = dict(images=0, annotations=0, second_observer=0, vessel_fraction=None, split=mm)
    fracs = []
    for idx, img_path, fov_path, labels in plan:
        rgb = _read_rgb(img_path)
        fov = _read_binary(fov_path) if fov_path is not None else np.ones(rgb.shape[:2], bool)
        _write_png(out / "images" / mm / f"{idx}.png", rgb)
        stats["images"] += 1
        for suffix, path in labels.items():
            label = _read_binary(path).astype(np.uint8)
            if fov_ignore:
                label[~fov] = IGNORE_INDEX
            _write_png(out / "annotations" / mm / f"{idx}_{suffix}.png", label)
            if suffix == "manual1":
                stats["annotations"] += 1
                fracs.append(float((label == 1).sum()) / max(1.0, float(fov.sum())))
            else:
                stats["second_observer"] += 1
    if fracs:
        stats["vessel_fraction"] = round(float(np.mean(fracs)), 4)
    if not has_manual:
        stats["note"] = "no 1st_manual folder: images written without annotations (not usable for validation)"
    return stats


def convert_drive(
    src: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    out: Union[str, os.PathLike],
    *,
    fov_ignore: bool = False,
    overwrite: bool = False,
) -> dict:
    """Convert raw DRIVE (folder or zip archives) to mmseg's layout under ``out``.

    Args:
        src: the DRIVE folder, or one or more zip archives (``training.zip``, ``test.zip``,
            ``DRIVE.zip``), or a list of those.
        out: output folder (e.g. ``datasets/fundus/drive_mmseg``).
        fov_ignore: write pixels outside the field of view as 255 (ignored by loss and metrics).
        overwrite: replace ``images/`` and ``annotations/`` of a non-empty ``out`` (anything else
            there is kept); without it a non-empty ``out`` is refused.

    Returns:
        A JSON-serialisable summary (counts per split).

    Raises:
        DriveLayoutError: the input is not raw DRIVE, or an annotation / mask is missing or has
            another size than its image (every file is checked before anything is written).
        FileExistsError: ``out`` is not empty and ``overwrite`` is False.
    """
    sources = [Path(s) for s in ([src] if isinstance(src, (str, os.PathLike)) else src)]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"refusing to write into non-empty folder '{out}'; pass --overwrite "
            f"(overwrite=True) to replace its {', '.join(_OWNED)}"
        )
    with tempfile.TemporaryDirectory(prefix="drive-") as tmp:
        roots: List[Path] = []
        for i, s in enumerate(sources):
            if s.is_file() and zipfile.is_zipfile(s):
                target = Path(tmp) / str(i)
                with zipfile.ZipFile(s) as zf:
                    zf.extractall(target)
                roots.append(find_drive_root(target))
            elif s.is_dir():
                roots.append(find_drive_root(s))
            else:
                raise DriveLayoutError(f"'{s}' is neither a folder nor a zip archive")
        plans = {}
        for split in SPLITS:
            found = [r for r in roots if (r / split / "images").is_dir()]
            if len(found) > 1:
                raise DriveLayoutError(f"{split}/ found in more than one input: {', '.join(map(str, found))}")
            if found:
                plans[split] = _plan_split(found[0], split, fov_ignore)
        if not plans:
            raise DriveLayoutError("no training/ or test/ split found in the input")
        for name in _OWNED:  # only after every input file checked out
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        summary: Dict = {"out": str(out), "fov_ignore": bool(fov_ignore), "splits": {}}
        for split, (plan, has_manual) in plans.items():
            summary["splits"][split] = _write_split(split, plan, has_manual, out, fov_ignore)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_drive.py",
        description="Convert raw DRIVE (folder or training.zip / test.zip) to mmseg's DRIVEDataset layout.",
    )
    parser.add_argument("src", nargs="+", help="DRIVE folder or zip archive(s)")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: <dataset root>/fundus/drive_mmseg, the dataset root being "
        "$RAT_DATASETS, else $DETECTRON2_DATASETS, else ./datasets)",
    )
    parser.add_argument(
        "--fov-ignore",
        action="store_true",
        help="label pixels outside the field of view 255 (ignored in loss and metrics)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace images/ and annotations/ in --out")
    args = parser.parse_args(argv)
    out = args.out or str(dataset_root() / "fundus" / "drive_mmseg")
    try:
        summary = convert_drive(args.src, out, fov_ignore=args.fov_ignore, overwrite=args.overwrite)
    except (DriveLayoutError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
