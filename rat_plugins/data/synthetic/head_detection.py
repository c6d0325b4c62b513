"""Synthetic head detection set in Roboflow's COCO export layout (``heads``).

Skin-toned ellipses with a darker hair cap (usually with eyes and a body below) on a textured
background; the box is the tight box of the head ellipse ``[cx - a, cy - b, 2a, 2b]``. Distractors
that are *not* heads: skin-coloured polygons without hair, hair-coloured balls and head-shaped
ellipses with a cap in non-skin colours. See docs/formats.md, Roboflow COCO export.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import List, Tuple, Union

import numpy as np

from ..roboflow import ORIGINAL_NAME
from ._common import (
    SizeArg,
    Writer,
    check_n,
    ellipse_r2,
    ellipse_window,
    image_size,
    item_rng,
    jitter,
    paint_ellipse,
    paint_polygon,
    prepare_out,
    textured_background,
    to_u8,
)

__all__ = ["make_heads", "HEADS_CATEGORIES"]

# Roboflow's category list: the supercategory as id 0, the real class as id 1.
HEADS_CATEGORIES = [
    {"id": 0, "name": "heads", "supercategory": "none"},
    {"id": 1, "name": "head", "supercategory": "heads"},
]

_SKIN = [(255, 224, 196), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 56, 30)]
_HAIR = [(20, 15, 10), (45, 30, 20), (70, 50, 30), (110, 80, 45), (30, 30, 30), (140, 110, 70)]
_BACKGROUNDS = [(90, 110, 130), (60, 90, 60), (120, 120, 120), (150, 160, 170), (70, 70, 90), (180, 180, 170)]
_NON_SKIN = [(40, 90, 200), (40, 160, 70), (140, 60, 160), (200, 200, 60), (60, 170, 180), (220, 60, 60)]


def _iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    ih = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    return inter / max(aw * ah + bw * bh - inter, 1e-9)


def _luma(c) -> float:
    c = np.asarray(c, np.float32)
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _head_colors(rng):
    skin = jitter(rng, _SKIN[rng.integers(len(_SKIN))], 12)
    hair = jitter(rng, _HAIR[rng.integers(len(_HAIR))], 10)
    if _luma(hair) > 0.55 * _luma(skin):
        hair = hair * (0.55 * _luma(skin) / max(_luma(hair), 1.0))
    return skin, hair


def _paint_head(img, cx, cy, a, b, skin, hair) -> None:
    """Hair-coloured ellipse with the lower face ellipse in skin colour, shaded, with eyes."""
    window = ellipse_window(img, cx, cy, a, b)
    if window is None:
        return
    region, xx, yy, r2 = window
    head = r2 <= 1.0
    face = head & (ellipse_r2(xx, yy, cx, cy + 0.24 * b, 0.86 * a, 0.84 * b) <= 1.0)
    shade = (1.0 - 0.2 * r2)[..., None]
    region[head] = np.asarray(hair, np.float32)[None] * shade[head]
    region[face] = np.asarray(skin, np.float32)[None] * shade[face]
    if a >= 6:
        eye = np.asarray(hair, np.float32) * 0.6
        for sx in (-1, 1):
            paint_ellipse(img, cx + sx * 0.38 * a, cy + 0.1 * b, max(0.9, 0.1 * a), max(0.9, 0.07 * b), eye)


def _paint_distractor(img, rng, cx, cy, size) -> str:
    kind = ("skin_polygon", "hair_ball", "capped_non_skin", "polygon")[rng.integers(4)]
    if kind in ("skin_polygon", "polygon"):
        if kind == "skin_polygon":
            color = jitter(rng, _SKIN[rng.integers(len(_SKIN))], 12)
        else:
            color = jitter(rng, _NON_SKIN[rng.integers(len(_NON_SKIN))], 25)
        k = int(rng.integers(3, 5))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k)) if k == 3 else np.arange(4) * np.pi / 2 + rng.uniform(0, 1)
        rad = size * 0.5 * rng.uniform(0.7, 1.0, k)
        paint_polygon(img, [(cx + r * math.cos(t), cy + r * math.sin(t)) for r, t in zip(rad, ang)], color)
    elif kind == "hair_ball":
        paint_ellipse(img, cx, cy, size * 0.4, size * 0.45, jitter(rng, _HAIR[rng.integers(len(_HAIR))], 8), 0.2)
    else:
        body = jitter(rng, _NON_SKIN[rng.integers(len(_NON_SKIN))], 20)
        _paint_head(img, cx, cy, size * 0.4, size * 0.5, body, body * 0.4)
    return kind


def _heads_image(
    rng, w, h, n_heads, force_outside: bool, allow_outside: bool, head_sizes=(20, 160), distractors=(1, 4)
):
    scale = min(w, h) / 640.0
    img = textured_background(rng, h, w, jitter(rng, _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))], 20))
    for _ in range(int(rng.integers(distractors[0], distractors[1] + 1))):
        size = float(np.exp(rng.uniform(np.log(20), np.log(140)))) * scale
        _paint_distractor(img, rng, rng.uniform(0, w), rng.uniform(0, h), size)
    heads: List[Tuple[float, float, float, float]] = []
    boxes: List[List[float]] = []
    outside = 0
    for k in range(n_heads):
        for _attempt in range(30):
            bh = float(np.exp(rng.uniform(np.log(head_sizes[0]), np.log(head_sizes[1])))) * scale
            bw = bh * rng.uniform(0.72, 0.88)
            a, b = bw / 2, bh / 2
            if force_outside and k == 0:
                side = int(rng.integers(4))
                frac = rng.uniform(0.2, 0.45)  # fraction of the box outside the image
                cx, cy = rng.uniform(a, w - a), rng.uniform(b, h - b)
                if side == 0:
                    cx = -a + (1 - frac) * bw
                elif side == 1:
                    cx = w + a - (1 - frac) * bw
                elif side == 2:
                    cy = -b + (1 - frac) * bh
                else:
                    cy = h + b - (1 - frac) * bh
            elif allow_outside and rng.random() < 0.05:
                cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            else:
                cx, cy = rng.uniform(a, w - a), rng.uniform(b, h - b)
            box = [cx - a, cy - b, bw, bh]
            if all(_iou(box, o) < 0.15 for o in boxes):
                heads.append((cx, cy, a, b))
                boxes.append(box)
                if box[0] < 0 or box[1] < 0 or box[0] + box[2] > w or box[1] + box[3] > h:
                    outside += 1
                break
    colors = [_head_colors(rng) for _ in heads]
    for (cx, cy, a, b), _ in zip(heads, colors):  # bodies first, so no body covers a head
        if rng.random() < 0.7:
            paint_ellipse(img, cx, cy + 2.0 * b, 1.9 * a, 1.25 * b, jitter(rng, (100, 100, 100), 90), 0.15)
    for (cx, cy, a, b), (skin, hair) in zip(heads, colors):
        _paint_head(img, cx, cy, a, b, skin, hair)
    return to_u8(img), boxes, outside


def make_heads(
    out: Union[str, os.PathLike],
    n: int = 48,
    seed: int = 0,
    size: SizeArg = 640,
    overwrite: bool = False,
    head_sizes: Tuple[float, float] = (20, 160),
    distractors: Tuple[int, int] = (1, 4),
) -> dict:
    """Roboflow COCO export of a one-class head detection set (docs/formats.md, Roboflow COCO export).

    Writes ``out/{train,valid,test}/_annotations.coco.json`` and the JPEGs beside it, with the
    Roboflow category list (supercategory ``heads`` as id 0, ``head`` as id 1). Train holds, per
    12 images, an image without annotations, a head whose box extends past the border, zero-width
    and zero-height duplicate boxes and a negative-width box; valid has an empty image and a
    partly-outside box; test is clean.

    Args:
        out: dataset folder (``datasets/coco``).
        n: number of train images (>= 4); valid and test get ``max(4, n // 4)`` each.
        seed: random seed.
        size: image size, an int or (width, height); 640 as in the real set.
        overwrite: replace the ``train/ valid/ test/`` folders of a non-empty ``out``.
        head_sizes: range of head heights in pixels at 640 (log-uniform; scaled with the image).
        distractors: range of non-head shapes per image.
    """
    if not 0 < head_sizes[0] <= head_sizes[1]:
        raise ValueError(f"heads: head_sizes must be 0 < low <= high, got {head_sizes}")
    if not 0 <= distractors[0] <= distractors[1]:
        raise ValueError(f"heads: distractors must be 0 <= low <= high, got {distractors}")
    n = check_n(n, 4, "heads")
    w, h = image_size(size, "heads")
    root = prepare_out(out, ("train", "valid", "test"), overwrite)
    wr = Writer(root)
    splits = {"train": n, "valid": max(4, n // 4), "test": max(4, n // 4)}
    summary = {"kind": "heads", "out": str(root), "seed": int(seed), "image_size": [w, h], "splits": {}}
    for si, (split, count) in enumerate(splits.items()):
        images, anns = [], []
        stats = dict(images=count, annotations=0, heads=0, empty_images=0, degenerate_boxes=0, boxes_partly_outside=0)
        for i in range(count):
            rng = item_rng("heads", seed, si, i)
            empty = split != "test" and i % 12 == 3
            force_outside = split != "test" and i % 12 == 1
            n_heads = 0 if empty else int(rng.integers(1, 6))
            rgb, boxes, outside = _heads_image(
                rng, w, h, n_heads, force_outside, split != "test", head_sizes, distractors
            )
            token = hashlib.md5(f"{seed}-{split}-{i}".encode()).hexdigest()
            file_name = f"img_{i:04d}_jpg.rf.{token}.jpg"
            wr.jpeg(f"{split}/{file_name}", rgb)
            images.append(
                {
                    "id": i,
                    "license": 1,
                    "file_name": file_name,
                    "height": h,
                    "width": w,
                    "date_captured": "2023-03-14T10:57:47+00:00",
                }
            )
            rows = [[round(v, 2) for v in box] for box in boxes]
            if split == "train" and boxes and i % 12 == 2:  # duplicate clicks: zero width / height
                x, y, bw, bh = rows[0]
                rows.append([x, y, 0.0, bh])
                x, y, bw, bh = rows[-2]
                rows.append([x, y, bw, 0.0])
            if split == "train" and boxes and i % 12 == 0:  # box dragged right-to-left
                x, y, bw, bh = rows[0]
                rows.append([round(x + bw, 2), y, -bw, bh])
            for box in rows:
                anns.append(
                    {
                        "id": len(anns),
                        "image_id": i,
                        "category_id": 1,
                        "bbox": box,
                        "area": round(box[2] * box[3], 2),
                        "segmentation": [],
                        "iscrowd": 0,
                    }
                )
                stats["degenerate_boxes"] += int(box[2] <= 0 or box[3] <= 0)
            stats["heads"] += len(boxes)
            stats["empty_images"] += int(not rows)
            stats["boxes_partly_outside"] += outside
        stats["annotations"] = len(anns)
        doc = {
            "info": {
                "year": "2023",
                "version": "1",
                "description": "Exported from roboflow.com",
                "contributor": "rat_plugins.data.synthetic",
                "url": "https://public.roboflow.com",
                "date_created": "2023-03-14T10:57:47+00:00",
            },
            "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}],
            "categories": [dict(c) for c in HEADS_CATEGORIES],
            "images": images,
            "annotations": anns,
        }
        wr.json(f"{split}/{ORIGINAL_NAME}", doc)
        summary["splits"][split] = stats
    summary["files"] = wr.files
    return summary
