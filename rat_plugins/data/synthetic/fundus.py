"""Synthetic vessel segmentation set in DRIVE's layout, raw or mmseg's converted one (``fundus``).

A reddish field-of-view disc with an optic disc and a vessel tree of branching random walks
1-3 px wide; the label is the vessel mask inside the field of view. The test split also has
``2nd_manual`` (a second observer who misses some thin vessels), as DRIVE has. See
docs/formats.md, DRIVE / fundus.
"""

from __future__ import annotations

import math
import os
from typing import Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ._common import SizeArg, Writer, check_n, image_size, item_rng, jitter, prepare_out, smooth_noise, to_u8

__all__ = ["make_fundus"]


def _vessel_tree(rng, od: Tuple[float, float], fov_c: Tuple[float, float], fov_r: float):
    """Branching random walks from the optic disc: list of (points, width, seen_by_observer_2)."""
    branches = []
    step = max(1.0, fov_r / 40.0)
    base = rng.uniform(0, 2 * np.pi)
    n_trunks = int(rng.integers(4, 7))
    stack = [
        ((od[0], od[1]), base + 2 * np.pi * k / n_trunks + rng.uniform(-0.3, 0.3), 3, 2.2 * fov_r)
        for k in range(n_trunks)
    ]
    while stack and len(branches) < 60:
        (x, y), ang, width, budget = stack.pop()
        pts = [(x, y)]
        turn = 0.0
        travelled = 0.0
        while travelled < budget:
            turn = 0.75 * turn + rng.normal(0, 0.045)
            ang += turn
            x, y = x + step * math.cos(ang), y + step * math.sin(ang)
            travelled += step
            if math.hypot(x - fov_c[0], y - fov_c[1]) > fov_r * 1.02:
                break
            pts.append((x, y))
            p_branch = 0.05 if width > 1 else 0.012
            if len(pts) > 4 and rng.random() < p_branch and len(branches) + len(stack) < 60:
                child = ang + rng.choice([-1, 1]) * rng.uniform(0.4, 1.0)
                stack.append(((x, y), child, max(1, width - 1), 0.6 * (budget - travelled)))
                if width > 1 and rng.random() < 0.5:
                    width -= 1
        if len(pts) >= 2:
            keep2 = not (width == 1 and rng.random() < 0.3)
            branches.append((pts, width, keep2))
    return branches


def _fundus_image(rng, w, h):
    s = min(w, h)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    cx, cy, fov_r = w / 2, h / 2, 0.46 * s
    rr = np.hypot(xx - cx, yy - cy)
    fov = rr <= fov_r
    ang = rng.uniform(-0.3, 0.3) + (0 if rng.random() < 0.5 else np.pi)
    od = (cx + 0.55 * fov_r * math.cos(ang), cy + 0.55 * fov_r * math.sin(ang))
    fovea = (cx - 0.3 * fov_r * math.cos(ang), cy - 0.3 * fov_r * math.sin(ang))
    base = jitter(rng, (205, 95, 40), 15)
    falloff = (1.0 - 0.45 * (rr / fov_r) ** 2)[..., None]
    img = base[None, None] * falloff
    img = img + 8.0 * smooth_noise(rng, h, w, 5, 3)
    d_od = np.hypot(xx - od[0], yy - od[1]) / (0.12 * fov_r)
    img += (np.exp(-(d_od**2)) * 1.0)[..., None] * np.asarray([45, 90, 60], np.float32)
    d_fv = np.hypot(xx - fovea[0], yy - fovea[1]) / (0.15 * fov_r)
    img *= (1.0 - 0.3 * np.exp(-(d_fv**2)))[..., None]
    branches = _vessel_tree(rng, od, (cx, cy), fov_r)
    masks = []
    for observer in (1, 2):
        m = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(m)
        for pts, width, keep2 in branches:
            if observer == 2 and not keep2:
                continue
            draw.line(pts, fill=255, width=int(width), joint="curve" if width > 1 else None)
        masks.append(np.where(fov, np.asarray(m), 0).astype(np.uint8))
    soft = np.asarray(Image.fromarray(masks[0]).filter(ImageFilter.GaussianBlur(0.6)), np.float32) / 255.0
    soft = np.maximum(soft, masks[0] / 255.0 * 0.8)
    img *= 1.0 - soft[..., None] * np.asarray([0.35, 0.6, 0.5], np.float32)
    img += 4.0 * rng.standard_normal(img.shape, dtype=np.float32)
    img[~fov] = rng.uniform(0, 6, (int((~fov).sum()), 3)).astype(np.float32)
    fov_mask = np.where(fov, 255, 0).astype(np.uint8)
    return to_u8(img), masks[0], masks[1], fov_mask, len(branches)


def make_fundus(
    out: Union[str, os.PathLike],
    n: int = 8,
    seed: int = 0,
    size: SizeArg = 128,
    layout: str = "raw",
    overwrite: bool = False,
) -> dict:
    """DRIVE-style vessel segmentation, raw DRIVE layout or mmseg's converted layout.

    ``layout="raw"``: ``training/images/21_training.tif``, ``training/1st_manual/21_manual1.gif``
    (vessel 255), ``training/mask/21_training_mask.gif`` (field of view 255), and ``test/`` with
    ``01_test.tif``, ``01_manual1.gif``, ``01_test_mask.gif`` and ``2nd_manual/01_manual2.gif``.
    ``layout="mmseg"``: what mmseg's ``tools/dataset_converters/drive.py`` writes:
    ``images/training/21.png`` + ``annotations/training/21_manual1.png`` (labels 0/1), and
    ``images/validation/01.png`` + ``annotations/validation/01_manual1.png``; the converter also
    copies the second observer, so ``annotations/validation/01_manual2.png`` exists without an
    image (mmseg's DRIVEDataset pairs ``X.png`` with ``X_manual1.png`` and ignores it).

    Args:
        out: dataset folder (``datasets/fundus`` raw, ``datasets/fundus/drive_mmseg`` mmseg).
        n: training images (>= 1, ids 21, 22, ...); test / validation get ``max(2, n // 2)``.
        seed: random seed.
        size: int or (width, height); real DRIVE is 565x584.
        layout: ``"raw"`` or ``"mmseg"``.
        overwrite: replace this layout's top folders of a non-empty ``out``.
    """
    if layout not in ("raw", "mmseg"):
        raise ValueError(f"fundus: layout must be 'raw' or 'mmseg', got {layout!r}")
    n = check_n(n, 1, "fundus")
    w, h = image_size(size, "fundus")
    owned = ("training", "test") if layout == "raw" else ("images", "annotations")
    root = prepare_out(out, owned, overwrite)
    wr = Writer(root)
    summary = {
        "kind": "fundus",
        "layout": layout,
        "out": str(root),
        "seed": int(seed),
        "image_size": [w, h],
        "splits": {},
    }
    n_test = max(2, n // 2)
    for si, (split, count, first_id) in enumerate((("training", n, 21), ("test", n_test, 1))):
        stats = dict(images=count, vessel_fraction=0.0, branches=0, second_observer=0)
        fracs = []
        for i in range(count):
            rng = item_rng("fundus", seed, si, i)
            rgb, manual1, manual2, fov, n_branches = _fundus_image(rng, w, h)
            idx = f"{first_id + i:02d}"
            stats["branches"] += n_branches
            fracs.append(float((manual1 > 0).sum()) / float((fov > 0).sum()))
            if layout == "raw":
                wr.image(f"{split}/images/{idx}_{split}.tif", Image.fromarray(rgb, "RGB"), "TIFF")
                wr.gif(f"{split}/1st_manual/{idx}_manual1.gif", manual1)
                wr.gif(f"{split}/mask/{idx}_{split}_mask.gif", fov)
                if split == "test":
                    wr.gif(f"{split}/2nd_manual/{idx}_manual2.gif", manual2)
                    stats["second_observer"] += 1
            else:
                mm = "training" if split == "training" else "validation"
                wr.png(f"images/{mm}/{idx}.png", rgb)
                wr.png(f"annotations/{mm}/{idx}_manual1.png", (manual1 // 255).astype(np.uint8))
                if split == "test":
                    wr.png(f"annotations/{mm}/{idx}_manual2.png", (manual2 // 255).astype(np.uint8))
                    stats["second_observer"] += 1
        stats["vessel_fraction"] = round(float(np.mean(fracs)), 4)
        summary["splits"][split if layout == "raw" else ("training" if si == 0 else "validation")] = stats
    summary["files"] = wr.files
    return summary
