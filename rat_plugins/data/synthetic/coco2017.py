"""Synthetic instance detection set in the COCO 2017 layout (``coco``).

Silhouettes of three classes with their real COCO ids (1 person, 3 car, 18 dog; random colours,
so shape is the signal) with polygon segmentations, areas spanning small, medium and large, one
``iscrowd=1`` group (uncompressed RLE) and one image without annotations per split. See
docs/formats.md, COCO 2017.
"""

from __future__ import annotations

import math
import os
from typing import List, Tuple, Union

import numpy as np

from ._common import (
    SizeArg,
    Writer,
    check_n,
    image_size,
    item_rng,
    jitter,
    paint_polygon,
    polygon_mask,
    prepare_out,
    textured_background,
    to_u8,
)

__all__ = ["make_coco", "COCO_CATEGORIES"]

COCO_CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "animal", "id": 18, "name": "dog"},
]


def _circle(cx, cy, r, k=12):
    return [(cx + r * math.cos(2 * np.pi * j / k), cy + r * math.sin(2 * np.pi * j / k)) for j in range(k)]


# Silhouettes in template units (y down); each is a list of polygons.
_COCO_TEMPLATES = {
    1: [
        _circle(20, 10, 9, 10),
        [
            (8, 21),
            (32, 21),
            (40, 55),
            (34, 56),
            (30, 38),
            (30, 100),
            (22, 100),
            (20, 65),
            (18, 100),
            (10, 100),
            (10, 38),
            (6, 56),
            (0, 55),
        ],
    ],
    3: [
        [(0, 22), (4, 14), (24, 12), (34, 0), (68, 0), (80, 12), (97, 15), (100, 30), (100, 38), (0, 38)],
        _circle(22, 38, 8),
        _circle(78, 38, 8),
    ],
    18: [
        [
            (20, 20),
            (75, 18),
            (80, 10),
            (88, 2),
            (96, 6),
            (100, 16),
            (92, 22),
            (86, 24),
            (84, 40),
            (80, 60),
            (74, 60),
            (72, 40),
            (32, 40),
            (30, 60),
            (24, 60),
            (22, 40),
            (14, 30),
            (4, 18),
            (2, 14),
            (10, 22),
        ]
    ],
}
_SIZE_RANGES = {"small": (150.0, 850.0), "medium": (1500.0, 7000.0), "large": (10500.0, 16000.0)}
_SIZE_MIN = {"small": 60.0, "medium": 1.15 * 32**2, "large": 1.1 * 96**2}


def _shoelace(poly) -> float:
    x, y = np.asarray(poly, np.float64).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _template_stats(cat: int):
    pts = np.concatenate([np.asarray(p, np.float64) for p in _COCO_TEMPLATES[cat]])
    lo, hi = pts.min(0), pts.max(0)
    area = sum(_shoelace(p) for p in _COCO_TEMPLATES[cat])  # overlaps count twice: close enough
    return lo, hi - lo, area


def _max_area(cat: int, w: int, h: int) -> float:
    """Largest mask area (px) a silhouette reaches when it fills 95 % of the image."""
    _, ext, area = _template_stats(cat)
    s = min(0.95 * w / ext[0], 0.95 * h / ext[1])
    return area * s * s


def _rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major runs, starting with zeros)."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _coco_image(rng, w, h, plan: List[Tuple[int, str]], crowd: bool):
    img = textured_background(rng, h, w, jitter(rng, (128, 128, 128), 40), texture=18.0, noise=7.0)
    for _ in range(int(rng.integers(0, 4))):  # unlabelled clutter, drawn first
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(4, 18) * min(w, h) / 256
        paint_polygon(
            img, [(x - r, y - r * 0.3), (x + r, y - r * 0.5), (x + r * 0.4, y + r)], jitter(rng, (128, 128, 128), 100)
        )
    taken: List[List[float]] = []
    anns = []

    def free(box):
        x, y, bw, bh = box
        return all(
            x + bw + 2 <= ox or ox + ow + 2 <= x or y + bh + 2 <= oy or oy + oh + 2 <= y for ox, oy, ow, oh in taken
        )

    if crowd:  # a row of small people annotated as one iscrowd region
        k = int(rng.integers(4, 8))
        lo, ext, _ = _template_stats(1)
        s = rng.uniform(0.22, 0.3) * min(w, h) / 256
        gw, gh = k * ext[0] * s * 0.9, ext[1] * s
        for _attempt in range(40):
            gx, gy = rng.uniform(0, w - gw), rng.uniform(0, h - gh)
            if free([gx, gy, gw, gh]):
                break
        else:
            gx = gy = None
        if gx is not None:
            polys = []
            for j in range(k):
                ox = gx + j * ext[0] * s * 0.9
                for p in _COCO_TEMPLATES[1]:
                    polys.append([(ox + (x - lo[0]) * s, gy + (y - lo[1]) * s) for x, y in p])
            color = jitter(rng, (128, 128, 128), 110)
            for p in polys:
                paint_polygon(img, p, color)
            mask = polygon_mask(w, h, polys)
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            taken.append(box)
            anns.append(
                dict(
                    category_id=1,
                    iscrowd=1,
                    segmentation=_rle(mask),
                    area=float(mask.sum()),
                    bbox=box,
                    size_class="crowd",
                )
            )

    def spot(bw, bh, anchor):
        for _attempt in range(40):
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            if anchor and rng.random() < 0.5:  # keep one side free for the rest of the plan: top ...
                y = min(rng.uniform(0, 0.04 * h), h - bh)
            elif anchor:  # ... or bottom
                y = max(h - bh - rng.uniform(0, 0.04 * h), 0)
            if free([x, y, bw, bh]):
                return x, y
        step = max(2.0, min(bw, bh) / 4)
        grid = [(x, y) for x in np.arange(0, w - bw, step) for y in np.arange(0, h - bh, step)]
        for j in rng.permutation(len(grid)):
            if free([grid[j][0], grid[j][1], bw, bh]):
                return grid[j]
        return None

    for j, (cat, size_class) in enumerate(plan):
        lo, ext, t_area = _template_stats(cat)
        target = rng.uniform(*_SIZE_RANGES[size_class])
        s = math.sqrt(target / t_area)
        s = min(s, 0.95 * w / ext[0], 0.95 * h / ext[1])
        stretch = rng.uniform(0.92, 1.08)
        flip = bool(rng.random() < 0.5)
        smallest = _SIZE_MIN[size_class] / t_area
        while True:
            bw, bh = min(ext[0] * s * stretch, 0.98 * w), ext[1] * s
            xy = spot(bw, bh, anchor=(j == 0 and size_class == "large" and len(plan) > 1))
            if xy is not None or (0.85 * s) ** 2 < smallest:
                break
            s *= 0.85  # no room: shrink, but stay in the size class
        if xy is None:
            continue
        x, y = float(xy[0]), float(xy[1])
        polys = []
        for p in _COCO_TEMPLATES[cat]:
            q = []
            for px, py in p:
                u = (px - lo[0]) / ext[0]
                u = 1 - u if flip else u
                q.append((round(x + u * bw, 2), round(y + (py - lo[1]) / ext[1] * bh, 2)))
            polys.append(q)
        color = jitter(rng, (128, 128, 128), 110)
        for j, p in enumerate(polys):
            shade = 0.35 if (cat == 3 and j > 0) else 1.0  # dark wheels
            paint_polygon(img, p, color * shade)
        mask = polygon_mask(w, h, polys)
        allp = np.concatenate([np.asarray(p) for p in polys])
        x0, y0 = allp.min(0)
        x1, y1 = allp.max(0)
        box = [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)]
        taken.append(box)
        anns.append(
            dict(
                category_id=cat,
                iscrowd=0,
                segmentation=[[c for xy in p for c in xy] for p in polys],
                area=float(mask.sum()),
                bbox=box,
                size_class=size_class,
            )
        )
    return to_u8(img), anns


def make_coco(
    out: Union[str, os.PathLike],
    n: int = 24,
    seed: int = 0,
    size: SizeArg = 256,
    overwrite: bool = False,
) -> dict:
    """COCO 2017 layout: ``annotations/instances_{train,val}2017.json``, ``{train,val}2017/*.jpg``.

    Categories 1 person, 3 car, 18 dog (their real ids). In each split image 0 has no annotations,
    image 1 holds a large, a medium and a small object, and image 2 an ``iscrowd=1`` group of
    people (uncompressed RLE); areas are mask pixel counts, so AP small / medium / large are all
    defined.

    Args:
        out: dataset folder (``datasets/coco2017``).
        n: train images (>= 3); val gets ``max(3, n // 3)``.
        seed: random seed.
        size: int or (width, height), at least 192 so that objects of area >= 96^2 fit.
        overwrite: replace ``annotations/ train2017/ val2017/`` of a non-empty ``out``.
    """
    n = check_n(n, 3, "coco")
    w, h = image_size(size, "coco")
    cats = [c["id"] for c in COCO_CATEGORIES]
    large_cats = [c for c in cats if _max_area(c, w, h) >= 1.15 * 96**2]
    if not large_cats:
        raise ValueError(f"coco: images must be at least 192x192 so large (>= 96^2) objects fit, got {w}x{h}")
    root = prepare_out(out, ("annotations", "train2017", "val2017"), overwrite)
    wr = Writer(root)
    counts = {"train2017": n, "val2017": max(3, n // 3)}
    id_rng = item_rng("coco", seed, 99)
    all_ids = id_rng.choice(np.arange(1, 581930), size=sum(counts.values()), replace=False)
    summary = {"kind": "coco", "out": str(root), "seed": int(seed), "image_size": [w, h], "splits": {}}
    offset = 0
    for si, (split, count) in enumerate(counts.items()):
        ids = sorted(int(v) for v in all_ids[offset : offset + count])
        offset += count
        images, anns = [], []
        stats = dict(images=count, annotations=0, empty_images=0, crowd=0, small=0, medium=0, large=0)
        for i, image_id in enumerate(ids):
            rng = item_rng("coco", seed, si, i)
            if i == 0:
                plan: List[Tuple[int, str]] = []
            elif i == 1:
                plan = [
                    (int(rng.choice(large_cats if c == "large" else cats)), c) for c in ("large", "medium", "small")
                ]
            else:
                k = int(rng.integers(1, 5))
                classes = rng.choice(["small", "medium", "large"], size=k, p=[0.45, 0.35, 0.2])
                plan = sorted(
                    ((int(rng.choice(large_cats if c == "large" else cats)), str(c)) for c in classes),
                    key=lambda cs: ("large", "medium", "small").index(cs[1]),
                )
            rgb, objs = _coco_image(rng, w, h, plan, crowd=(i == 2))
            file_name = f"{image_id:012d}.jpg"
            wr.jpeg(f"{split}/{file_name}", rgb)
            images.append(
                {
                    "license": 1,
                    "file_name": file_name,
                    "coco_url": f"http://images.cocodataset.org/{split}/{file_name}",
                    "height": h,
                    "width": w,
                    "date_captured": "2013-11-14 11:18:45",
                    "flickr_url": "",
                    "id": image_id,
                }
            )
            for o in objs:
                ann_id = (si + 1) * 1_000_000 + len(anns) + 1
                anns.append(
                    {
                        "segmentation": o["segmentation"],
                        "area": o["area"],
                        "iscrowd": o["iscrowd"],
                        "image_id": image_id,
                        "bbox": o["bbox"],
                        "category_id": o["category_id"],
                        "id": ann_id,
                    }
                )
                if o["iscrowd"]:
                    stats["crowd"] += 1
                else:
                    key = "small" if o["area"] < 32**2 else "medium" if o["area"] < 96**2 else "large"
                    stats[key] += 1
            stats["empty_images"] += int(not objs)
        stats["annotations"] = len(anns)
        doc = {
            "info": {
                "description": "Synthetic COCO-2017-layout set (rat_plugins.data.synthetic)",
                "url": "http://cocodataset.org",
                "version": "1.0",
                "year": 2017,
                "contributor": "rat_plugins",
                "date_created": "2017/09/01",
            },
            "licenses": [
                {"url": "http://creativecommons.org/licenses/by/2.0/", "id": 1, "name": "Attribution License"}
            ],
            "images": images,
            "annotations": anns,
            "categories": [dict(c) for c in COCO_CATEGORIES],
        }
        wr.json(f"annotations/instances_{split}.json", doc)
        summary["splits"][split] = stats
    summary["files"] = wr.files
    return summary
