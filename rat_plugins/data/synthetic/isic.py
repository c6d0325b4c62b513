"""Synthetic lesion segmentation set in the ISIC 2018 Task 1 layout (``isic``).

Rule: **mask = pigmented blobs lying inside a faint, large halo**. Every image has one faint
darker / redder halo (soft edge, about 55-85 % of the image side) holding one or two brown lesion
blobs; blobs from the same distribution placed *outside* the halo are distractors and not in the
mask. Locally a lesion and a distractor look alike, so large-scale context decides the class; the
outline is a radial function with harmonics up to order 48 plus thin spicules, so the mask also
needs fine boundary detail. Lesion and distractor radii come from the same distribution (6-20 % of
the shorter side). Hairs (thin dark curves, not in the mask) and dark dermatoscope corners are
the imperfections. See docs/formats.md, ISIC 2018 Task 1.

``make_isic_context`` and ``make_isic_radius`` write the positive controls of the RAT study in the
same layout: answers known by construction that need distant context, and distances in physical
units (see their docstrings).
"""

from __future__ import annotations

import math
import os
from typing import Union

import numpy as np
from PIL import Image, ImageDraw

from ..isic_layout import ISIC_FOLDERS
from ._common import (
    SizeArg,
    Writer,
    check_n,
    item_rng,
    jitter,
    pixel_grid,
    prepare_out,
    smooth_noise,
    textured_background,
    to_u8,
)

__all__ = ["make_isic", "make_isic_context", "make_isic_radius"]

# context control: the lesion reaches at most CONTEXT_LESION_MAX (x the side) from its centre, and
# the surround that decides its label (its brightness times CONTEXT_DARKENING) starts at
# CONTEXT_SURROUND
CONTEXT_LESION_MAX = 0.09 * 1.2
CONTEXT_SURROUND = 0.39
CONTEXT_DARKENING = 0.45


def _blob_radius(rng, r0: float, n_theta: int = 2048) -> np.ndarray:
    """Radius of an irregular blob on a grid of ``n_theta`` angles: harmonics 2..48 + spicules."""
    theta = np.linspace(0, 2 * np.pi, n_theta, endpoint=False)
    ks = np.arange(2, 49)
    amp = rng.standard_normal(ks.size) * ks**-1.1
    amp *= rng.uniform(0.1, 0.2) / np.sqrt((amp**2).sum() / 2)
    phase = rng.uniform(0, 2 * np.pi, ks.size)
    r = 1.0 + (amp[:, None] * np.cos(ks[:, None] * theta[None] + phase[:, None])).sum(0)
    for _ in range(int(rng.integers(0, 7))):  # thin spicules: fine boundary detail
        t0, height, width = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.4), rng.uniform(0.015, 0.05)
        d = np.angle(np.exp(1j * (theta - t0)))
        r += height * np.exp(-((d / width) ** 2))
    return r0 * np.maximum(r, 0.4)


def _paint_blob(img, mask, rng, cx, cy, radius: np.ndarray, color) -> None:
    h, w = img.shape[:2]
    rmax = float(radius.max())
    c = pixel_grid(cx, cy, rmax, rmax, w, h)
    if c is None:
        return
    x0, y0, x1, y1, xx, yy = c
    dx, dy = xx - cx, yy - cy
    theta = np.mod(np.arctan2(dy, dx), 2 * np.pi)
    pos = theta / (2 * np.pi) * radius.size
    i0 = np.floor(pos).astype(int) % radius.size
    frac = pos - np.floor(pos)
    rb = radius[i0] * (1 - frac) + radius[(i0 + 1) % radius.size] * frac
    rr = np.hypot(dx, dy)
    inside = rr <= rb
    mottle = smooth_noise(rng, y1 - y0, x1 - x0, 5, 1)[..., 0] * 0.1
    dark = 0.78 + 0.22 * np.clip(rr / np.maximum(rb, 1e-6), 0, 1)
    col = np.asarray(color, np.float32)[None] * ((dark + mottle)[inside])[:, None]
    img[y0:y1, x0:x1][inside] = col
    if mask is not None:
        mask[y0:y1, x0:x1][inside] = 255


def _isic_image(rng, w, h):
    s = min(w, h)
    skin = jitter(rng, (222, 168, 145), 14)
    img = textured_background(rng, h, w, skin, texture=5.0, noise=5.0, cells=4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mask = np.zeros((h, w), np.uint8)
    lesion_color = jitter(rng, (130, 80, 60), 18)
    margin = 0.03 * s
    # the lesion and the halo around it: faint, large, soft-edged; the context that decides
    r0 = float(np.exp(rng.uniform(np.log(0.06), np.log(0.2)))) * s
    radius = _blob_radius(rng, r0)
    rmax = float(radius.max())
    hax = min(rmax * rng.uniform(1.6, 2.4), 0.45 * w)
    hay = min(rmax * rng.uniform(1.6, 2.4), 0.45 * h)
    while min(hax, hay) < rmax + 2 * margin:  # only for extreme aspect ratios
        radius *= 0.85
        rmax = float(radius.max())
    hcx = rng.uniform(min(0.6 * hax, w / 2), max(w - 0.6 * hax, w / 2))
    hcy = rng.uniform(min(0.6 * hay, h / 2), max(h - 0.6 * hay, h / 2))
    d = np.sqrt(((xx - hcx) / hax) ** 2 + ((yy - hcy) / hay) ** 2)
    halo = 1.0 / (1.0 + np.exp(np.minimum((d - 1.0) / 0.06, 60.0)))
    img += halo[..., None] * np.asarray([-6.0, -20.0, -16.0], np.float32)
    blobs = [radius]
    if rng.random() < 0.25:  # a second, smaller lesion in the same halo
        blobs.append(_blob_radius(rng, r0 * rng.uniform(0.3, 0.5)))
    n_lesions = 0
    for radius in blobs:
        room = min(hax, hay) - float(radius.max()) - margin
        if room < 0:
            continue
        u, rad = rng.uniform(0, 2 * np.pi), room * math.sqrt(rng.random())
        _paint_blob(
            img, mask, rng, hcx + rad * math.cos(u), hcy + rad * math.sin(u), radius, jitter(rng, lesion_color, 8)
        )
        n_lesions += 1
    n_distractors = 0
    for _ in range(int(rng.integers(1, 4))):  # distractors: same look and sizes, outside the halo
        radius = _blob_radius(rng, float(np.exp(rng.uniform(np.log(0.06), np.log(0.2)))) * s)
        rmax = float(radius.max())
        for _attempt in range(20):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            dn = math.sqrt(((cx - hcx) / hax) ** 2 + ((cy - hcy) / hay) ** 2)
            # elliptic-norm triangle inequality: the whole blob lies beyond the halo's soft edge
            if dn > 1.15 + (rmax + margin) / min(hax, hay):
                _paint_blob(img, None, rng, cx, cy, radius, jitter(rng, lesion_color, 10))
                n_distractors += 1
                break
    u8 = Image.fromarray(to_u8(img), "RGB")
    draw = ImageDraw.Draw(u8)
    n_hairs = int(rng.integers(0, 4))
    for _ in range(n_hairs):  # hairs: thin dark quadratic curves, not part of the mask
        p0, p1, p2 = (rng.uniform(0, 1, 2) * (w, h) for _ in range(3))
        t = np.linspace(0, 1, 40)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        tone = int(rng.integers(30, 70))
        draw.line([tuple(p) for p in pts.tolist()], fill=(tone, tone - 10, tone - 15), width=1)
    rgb = np.asarray(u8).copy()
    vignette = bool(rng.random() < 0.3)
    if vignette:  # dark dermatoscope corners
        rv = rng.uniform(0.5, 0.56) * math.hypot(w, h)
        dc = np.hypot(xx - w / 2, yy - h / 2)
        rgb[dc > rv] = (rgb[dc > rv] * 0.08).astype(np.uint8)
    return rgb, mask, dict(lesions=n_lesions, distractors=n_distractors, hairs=n_hairs, vignette=int(vignette))


def make_isic(
    out: Union[str, os.PathLike],
    n: int = 24,
    seed: int = 0,
    size: SizeArg = (96, 320),
    overwrite: bool = False,
) -> dict:
    """ISIC 2018 Task 1 layout (docs/formats.md, ISIC 2018 Task 1) with the halo rule of this module.

    Writes ``ISIC2018_Task1-2_{Training,Validation,Test}_Input/ISIC_XXXXXXX.jpg`` (with
    ``ATTRIBUTION.txt`` and ``LICENSE.txt``) and ``ISIC2018_Task1_*_GroundTruth/
    ISIC_XXXXXXX_segmentation.png`` (single channel, 0/255, image size). Ids are unique across
    splits and not contiguous, as in the real set.

    Args:
        out: dataset folder (``datasets/isic2018``).
        n: number of training images (>= 1); validation and test get ``max(4, n // 4)`` each.
        seed: random seed.
        size: ``(lo, hi)``: width and height are drawn independently in ``[lo, hi]`` and differ;
            an int gives square images of that size.
        overwrite: replace the six ISIC folders of a non-empty ``out``.
    """
    n = check_n(n, 1, "isic")
    if isinstance(size, (int, np.integer)):
        lo = hi = int(size)
    else:
        lo, hi = (int(v) for v in size)
    if lo < 32 or hi < lo:
        raise ValueError(f"isic: size range must satisfy 32 <= lo <= hi, got {size!r}")
    owned = [f for pair in ISIC_FOLDERS.values() for f in pair]
    root = prepare_out(out, owned, overwrite)
    wr = Writer(root)
    counts = {"Training": n, "Validation": max(4, n // 4), "Test": max(4, n // 4)}
    summary = {"kind": "isic", "out": str(root), "seed": int(seed), "size_range": [lo, hi], "splits": {}}
    id_rng = item_rng("isic", seed, 99)
    next_id = 0
    for si, (split, count) in enumerate(counts.items()):
        in_dir, gt_dir = ISIC_FOLDERS[split]
        stats = dict(images=count, masks=count, lesions=0, distractors=0, hairs=0, vignettes=0, sizes=[])
        for i in range(count):
            rng = item_rng("isic", seed, si, i)
            w = int(rng.integers(lo, hi + 1))
            h = int(rng.integers(lo, hi + 1))
            while lo < hi and h == w:
                h = int(rng.integers(lo, hi + 1))
            rgb, mask, info = _isic_image(rng, w, h)
            name = f"ISIC_{next_id:07d}"
            next_id += int(id_rng.integers(1, 4))
            wr.jpeg(f"{in_dir}/{name}.jpg", rgb)
            wr.png(f"{gt_dir}/{name}_segmentation.png", mask)
            stats["lesions"] += info["lesions"]
            stats["distractors"] += info["distractors"]
            stats["hairs"] += info["hairs"]
            stats["vignettes"] += info["vignette"]
            stats["sizes"].append([w, h])
        wr.text(
            f"{in_dir}/ATTRIBUTION.txt",
            "Synthetic images written by rat_plugins.data.synthetic (no real patient data).\n",
        )
        wr.text(
            f"{in_dir}/LICENSE.txt",
            "Synthetic data; the real ISIC 2018 images are CC-BY-NC 4.0, see the ISIC archive.\n",
        )
        summary["splits"][split] = stats
    summary["files"] = wr.files
    return summary


def _context_image(rng, size: int, cue: bool):
    skin = jitter(rng, (222, 168, 145), 14)
    img = textured_background(rng, size, size, skin, texture=5.0, noise=5.0, cells=4)
    centre = size / 2 + rng.uniform(-size / 24, size / 24, 2)
    if cue:  # the distant context: everything CONTEXT_SURROUND x the side or more from the lesion's centre
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        img[np.hypot(xx - centre[0], yy - centre[1]) >= CONTEXT_SURROUND * size] *= CONTEXT_DARKENING
    mask = np.zeros((size, size), np.uint8)
    # an irregular outline, at most 1.2 x its base radius (no long spicules: the ring stays far)
    radius = np.minimum(_blob_radius(rng, size * rng.uniform(0.08, 0.09)), size * CONTEXT_LESION_MAX)
    _paint_blob(img, mask if cue else None, rng, centre[0], centre[1], radius, jitter(rng, (130, 80, 60), 12))
    return to_u8(img), mask


def _write_square_set(out, kind: str, n: int, seed: int, size: int, overwrite: bool, draw) -> dict:
    """The ISIC layout for a control set: ``draw(rng) -> (rgb uint8, mask uint8, counts)`` per image;
    ``counts`` (a dict of numbers) is summed per split into the summary."""
    owned = [f for pair in ISIC_FOLDERS.values() for f in pair]
    root = prepare_out(out, owned, overwrite)
    wr = Writer(root)
    counts = {"Training": n, "Validation": max(4, n // 4), "Test": max(4, n // 4)}
    summary = {"kind": kind, "out": str(root), "seed": int(seed), "size": size, "splits": {}}
    next_id = 0
    for si, (split, count) in enumerate(counts.items()):
        in_dir, gt_dir = ISIC_FOLDERS[split]
        stats = dict(images=count)
        for i in range(count):
            rgb, mask, extra = draw(item_rng(kind, seed, si, i))
            name = f"ISIC_{next_id:07d}"
            next_id += 1
            wr.jpeg(f"{in_dir}/{name}.jpg", rgb)
            wr.png(f"{gt_dir}/{name}_segmentation.png", mask)
            for key, value in extra.items():
                stats[key] = stats.get(key, 0) + value
        wr.text(f"{in_dir}/ATTRIBUTION.txt", "Synthetic images written by rat_plugins.data.synthetic.\n")
        summary["splits"][split] = stats
    summary["files"] = wr.files
    return summary


def make_isic_context(
    out: Union[str, os.PathLike], n: int = 48, seed: int = 0, size: int = 96, overwrite: bool = False
) -> dict:
    """The RAT study's context control, in the ISIC 2018 Task 1 layout (square ``size`` images).

    Rule: **the lesion is in the mask only when the image is dark around it, from a distance.**
    Every image holds one lesion blob near its centre (radius 8-9 % of the side, at most
    ``CONTEXT_LESION_MAX``); in half of the images (drawn per image) everything from
    ``CONTEXT_SURROUND`` x the side away from the lesion's centre is darkened. The blob and its near
    surroundings look the same either way: at 64x64 the dark surround starts 18+ pixels beyond the
    lesion's edge, out of reach of a model whose outputs see 14 pixels, so only a model that sees
    farther (here: through coarse pyramid levels) can tell the two apart. Splits: ``n`` training,
    ``max(4, n // 4)`` validation and test images.
    """
    n = check_n(n, 1, "isic_context")
    size = int(size)
    if size < 64:
        raise ValueError(f"isic_context: size must be >= 64 (the ring must lie far from the lesion), got {size}")

    def draw(rng):
        cue = bool(rng.random() < 0.5)
        rgb, mask = _context_image(rng, size, cue)
        return rgb, mask, dict(dark_surround=int(cue))

    return _write_square_set(out, "isic_context", n, seed, size, overwrite, draw)


def make_isic_radius(
    out: Union[str, os.PathLike], n: int = 48, seed: int = 0, size: int = 64, overwrite: bool = False
) -> dict:
    """The RAT study's physical-units control, in the ISIC 2018 Task 1 layout (square ``size`` images).

    Rule: **the mask is the disc of radius size / 4 around a dark marker** (radius size / 12,
    anywhere at least the disc's radius from the border) on plain skin; nothing in the image shows
    the disc's edge, so a model must measure the distance from the marker. The skin has no texture
    (only a little pixel noise), so what a model sees locally changes little when the image is
    resized, and the distance is what a resolution changes. Tested at another resolution with the
    spacing scaled, the disc keeps its physical radius; without the scaling a model that measures
    in position units draws it at the wrong size. Splits as :func:`make_isic_context`.
    """
    n = check_n(n, 1, "isic_radius")
    size = int(size)
    if size < 48:
        raise ValueError(f"isic_radius: size must be >= 48 (a marker of a few pixels), got {size}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius, marker = size / 4, size / 12

    def draw(rng):
        img = textured_background(rng, size, size, jitter(rng, (222, 168, 145), 14), texture=0.0, noise=2.0)
        cx, cy = rng.uniform(radius, size - radius, 2)
        distance = np.hypot(xx - cx, yy - cy)
        img[distance <= marker] = np.asarray(jitter(rng, (90, 55, 45), 10), np.float32)
        return to_u8(img), np.where(distance <= radius, 255, 0).astype(np.uint8), {}

    return _write_square_set(out, "isic_radius", n, seed, size, overwrite, draw)
