"""Small, deterministic synthetic datasets in exactly the layouts of the real ones.

Each generator writes a dataset whose learnable signal has a known answer, in the folder layout and
file formats of the real export (see ``datasets/README.md``), including the imperfections real
exports have. Same arguments and seed give byte-identical files. Only numpy, Pillow and (for
``events``) h5py are used; neither torch nor a framework is imported.

Command line (one JSON summary line on stdout)::

    python -m rat_plugins.data.synthetic heads  --out datasets/coco
    python -m rat_plugins.data.synthetic isic   --out datasets/isic2018
    python -m rat_plugins.data.synthetic fundus --out datasets/fundus
    python -m rat_plugins.data.synthetic fundus --out datasets/fundus/drive_mmseg --layout mmseg
    python -m rat_plugins.data.synthetic events --out datasets/events/synthetic
    python -m rat_plugins.data.synthetic coco   --out datasets/coco2017

Common options: ``--n N`` (size of the first split), ``--seed S``, ``--size`` (``640``, ``WxH``; for
``isic`` a range ``LO,HI``), ``--overwrite``.

The kinds and their signals:

- ``heads`` (Roboflow COCO export, one class): skin-toned ellipses with a darker hair cap (and
  usually eyes and a body below) on a textured background; the box is the tight bounding box of the
  head ellipse ``[cx - a, cy - b, 2a, 2b]``. Distractors that are *not* heads: skin-coloured
  polygons without hair, hair-coloured balls, head-shaped ellipses with a cap in non-skin colours.
- ``isic`` (ISIC 2018 Task 1): rule **mask = pigmented blobs lying inside a faint, large halo**.
  Every image has one faint darker/redder halo region (soft edge, about 55-85 % of the image side)
  holding one or two brown lesion blobs; brown blobs drawn from the same distribution placed
  *outside* the halo are distractors and are not in the mask. Locally a lesion and a distractor are
  indistinguishable, so large-scale context decides the class; the blob outline is a radial
  function with harmonics up to order 48 plus thin spicules, so the mask also needs fine boundary
  detail. Lesion and distractor radii are drawn from the same
  distribution (6-20 % of the shorter side). Hairs (thin dark curves, not in the mask)
  and dark dermatoscope corners are the imperfections.
- ``fundus`` (DRIVE): a reddish field-of-view disc with an optic disc and a vessel tree of
  branching random walks 1-3 px wide; the label is the vessel mask inside the field of view. The
  test split also has ``2nd_manual`` (a second observer who misses some thin vessels), as DRIVE has.
- ``events`` (RVT preprocessed): objects of 8 classes (class = shape + aspect ratio, see
  ``EVENT_CLASSES``) moving linearly over a static background; the 20-channel stacked histogram
  counts brightness-change events (polarity 0 = OFF, 1 = ON; channel = polarity * 10 + bin) at the
  moving edges, clipped at 10, plus background noise and hot pixels. As in RVT's
  ``*_ds2_nearest.h5`` files the histogram is the sensor grid downsampled by 2 (nearest-exact) and
  the **labels are in sensor pixels** (twice the histogram size); RVT halves them when reading.
- ``coco`` (COCO 2017, three real category ids 1 person, 3 car, 18 dog): silhouettes of the three
  classes (random colours, so shape is the signal) with polygon segmentations, areas spanning
  small, medium and large, one ``iscrowd=1`` group (uncompressed RLE) and one image without
  annotations per split.

Writes are atomic (a temporary file in the same folder, then ``os.replace``). A non-empty output
folder is refused unless ``overwrite=True`` / ``--overwrite``, which first removes only the entries
the generator owns (e.g. ``train/ valid/ test/`` for ``heads``) and keeps anything else.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "make_heads",
    "make_isic",
    "make_fundus",
    "make_events",
    "make_coco",
    "main",
    "DatasetExistsError",
    "GENERATORS",
    "HEADS_CATEGORIES",
    "COCO_CATEGORIES",
    "EVENT_CLASSES",
    "RVT_LABEL_DTYPE",
]

SizeArg = Union[int, Sequence[int]]

JPEG_QUALITY = 90

HEADS_CATEGORIES = [
    {"id": 0, "name": "heads", "supercategory": "none"},
    {"id": 1, "name": "head", "supercategory": "heads"},
]
COCO_CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "animal", "id": 18, "name": "dog"},
]
# RVT's label record, field for field.
RVT_LABEL_DTYPE = np.dtype(
    [
        ("t", "<u8"),
        ("x", "<f4"),
        ("y", "<f4"),
        ("w", "<f4"),
        ("h", "<f4"),
        ("class_id", "u1"),
        ("class_confidence", "<f4"),
        ("track_id", "<u4"),
    ]
)
# class_id -> (shape, width / height, (min, max) of the longer side in sensor px at 128 px).
EVENT_CLASSES = (
    ("rect", 0.4, (10, 26)),
    ("ellipse", 1.0, (8, 16)),
    ("rect", 2.0, (24, 56)),
    ("ellipse", 2.0, (16, 40)),
    ("rect", 1.0, (12, 30)),
    ("ellipse", 0.5, (12, 30)),
    ("rect", 3.0, (36, 72)),
    ("ellipse", 0.33, (14, 36)),
)
EVENT_REPR_NAME = "stacked_histogram_dt=50_nbins=10"
EVENT_H5_NAME = "event_representations_ds2_nearest.h5"

_SALT = {"heads": 101, "isic": 202, "fundus": 303, "events": 404, "coco": 505}


class DatasetExistsError(FileExistsError):
    """The output folder is not empty and ``overwrite`` was not given."""


# ----------------------------------------------------------------------------- writing helpers


def _rng(kind: str, seed: int, *keys: int) -> np.random.Generator:
    """One independent generator per (kind, seed, split, item): items do not depend on ``n``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SALT[kind], *map(int, keys)]))


def _prepare_out(out: Union[str, os.PathLike], owned: Iterable[str], overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"dataset folder '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        owned = list(owned)
        if not overwrite:
            raise DatasetExistsError(
                f"refusing to write into non-empty dataset folder '{out}'; pass --overwrite "
                f"(overwrite=True) to replace its {', '.join(owned)}"
            )
        for name in owned:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


class _Writer:
    """Writes files under ``root`` atomically and counts them."""

    def __init__(self, root: Path):
        self.root = root
        self.files = 0

    def _target(self, rel: str) -> Tuple[Path, Path]:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path, path.with_name(f".{path.name}.tmp-{os.getpid()}")

    @contextlib.contextmanager
    def _atomic(self, rel: str):
        path, tmp = self._target(rel)
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        self.files += 1

    def bytes(self, rel: str, data: bytes) -> None:
        with self._atomic(rel) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)

    def text(self, rel: str, text: str) -> None:
        self.bytes(rel, text.encode("utf-8"))

    def json(self, rel: str, obj) -> None:
        self.bytes(rel, json.dumps(obj).encode("utf-8"))

    def image(self, rel: str, img: Image.Image, fmt: str, **kwargs) -> None:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kwargs)
        self.bytes(rel, buf.getvalue())

    def jpeg(self, rel: str, rgb: np.ndarray) -> None:
        self.image(rel, Image.fromarray(rgb, "RGB"), "JPEG", quality=JPEG_QUALITY, optimize=False)

    def png(self, rel: str, arr: np.ndarray) -> None:
        mode = "RGB" if arr.ndim == 3 else "L"
        self.image(rel, Image.fromarray(arr, mode), "PNG", compress_level=6)

    def gif(self, rel: str, mask: np.ndarray) -> None:
        """A greyscale-palette GIF, as DRIVE's masks: reads back as mode L with values 0/255."""
        img = Image.fromarray(mask.astype(np.uint8), "P")
        img.putpalette([v for i in range(256) for v in (i, i, i)])
        self.image(rel, img, "GIF", optimize=False)

    def npy(self, rel: str, arr: np.ndarray) -> None:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
        self.bytes(rel, buf.getvalue())

    def npz(self, rel: str, **arrays: np.ndarray) -> None:
        """Like ``np.savez`` but with fixed zip timestamps, so the bytes are reproducible."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                member = io.BytesIO()
                np.lib.format.write_array(member, np.asarray(arr), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                info.create_system = 3
                info.external_attr = 0o644 << 16
                zf.writestr(info, member.getvalue())
        self.bytes(rel, buf.getvalue())

    def h5(self, rel: str, data: np.ndarray) -> None:
        """RVT's event representation file: dataset ``data`` chunked per time step, gzip."""
        from .._optional import require

        h5py = require("h5py", "rat_plugins.data.synthetic (events)")
        with self._atomic(rel) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset(
                    "data",
                    data=data,
                    chunks=(1,) + tuple(data.shape[1:]),
                    maxshape=(None,) + tuple(data.shape[1:]),
                    compression="gzip",
                    compression_opts=4,
                    track_times=False,
                )


def _size2(size: SizeArg, name: str) -> Tuple[int, int]:
    """``640`` -> (640, 640); ``(w, h)`` -> (w, h)."""
    if isinstance(size, (int, np.integer)):
        w = h = int(size)
    else:
        if len(size) != 2:
            raise ValueError(f"{name}: size must be an int or (width, height), got {size!r}")
        w, h = (int(v) for v in size)
    if w < 16 or h < 16:
        raise ValueError(f"{name}: size must be at least 16 px, got {w}x{h}")
    return w, h


def _check_n(n: int, minimum: int, name: str) -> int:
    n = int(n)
    if n < minimum:
        raise ValueError(f"{name}: n must be at least {minimum} (so every imperfection fits), got {n}")
    return n


# ----------------------------------------------------------------------------- drawing helpers


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] += 1 - frac
    m[np.arange(n_out), i1] += frac
    return m


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise, roughly unit variance, [h, w, channels] (bilinear upsampling)."""
    ch = max(2, int(round(cells * h / max(h, w))) + 1)
    cw = max(2, int(round(cells * w / max(h, w))) + 1)
    grid = rng.standard_normal((ch, cw, channels)).astype(np.float32)
    mh, mw = _interp_matrix(h, ch), _interp_matrix(w, cw)
    rows = np.tensordot(mh, grid, axes=(1, 0))  # [h, cw, c]
    return np.ascontiguousarray(np.tensordot(rows, mw, axes=(1, 1)).transpose(0, 2, 1))  # [h, w, c]


def _crop(cx: float, cy: float, rx: float, ry: float, w: int, h: int):
    x0, x1 = max(0, int(math.floor(cx - rx)) - 1), min(w, int(math.ceil(cx + rx)) + 2)
    y0, y1 = max(0, int(math.floor(cy - ry)) - 1), min(h, int(math.ceil(cy + ry)) + 2)
    if x0 >= x1 or y0 >= y1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    return x0, y0, x1, y1, xx, yy


def _ellipse_r2(xx, yy, cx, cy, a, b):
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2


def _paint_ellipse(img: np.ndarray, cx, cy, a, b, color, shade: float = 0.0) -> None:
    h, w = img.shape[:2]
    c = _crop(cx, cy, a, b, w, h)
    if c is None:
        return
    x0, y0, x1, y1, xx, yy = c
    r2 = _ellipse_r2(xx, yy, cx, cy, a, b)
    m = r2 <= 1.0
    col = np.asarray(color, np.float32)[None, :] * (1.0 - shade * r2[m])[:, None]
    img[y0:y1, x0:x1][m] = col


def _poly_mask(w: int, h: int, polys: Sequence[Sequence[Tuple[float, float]]]) -> np.ndarray:
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    for p in polys:
        d.polygon([(float(x), float(y)) for x, y in p], fill=255)
    return np.asarray(m) > 0


def _paint_polygon(img: np.ndarray, pts: Sequence[Tuple[float, float]], color) -> None:
    h, w = img.shape[:2]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0 = max(0, int(min(xs)) - 1), max(0, int(min(ys)) - 1)
    x1, y1 = min(w, int(max(xs)) + 2), min(h, int(max(ys)) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    m = _poly_mask(x1 - x0, y1 - y0, [[(x - x0, y - y0) for x, y in pts]])
    img[y0:y1, x0:x1][m] = np.asarray(color, np.float32)


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _textured_background(rng, h, w, base, texture=22.0, noise=9.0, cells=6) -> np.ndarray:
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.asarray(base, np.float32)
    img += texture * _smooth_noise(rng, h, w, cells, 1)  # brightness
    img += texture * 0.4 * _smooth_noise(rng, h, w, cells, 3)  # some colour
    img += texture * 0.5 * _smooth_noise(rng, h, w, cells * 4, 1)
    img += (rng.random((h, w, 3), dtype=np.float32) - 0.5) * (noise * math.sqrt(12.0))  # std = noise
    return img


def _jitter(rng, color, amount) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _iou(a, b) -> float:
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    ih = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    return inter / max(aw * ah + bw * bh - inter, 1e-9)


# ----------------------------------------------------------------------------- heads


_SKIN = [(255, 224, 196), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 56, 30)]
_HAIR = [(20, 15, 10), (45, 30, 20), (70, 50, 30), (110, 80, 45), (30, 30, 30), (140, 110, 70)]
_BACKGROUNDS = [(90, 110, 130), (60, 90, 60), (120, 120, 120), (150, 160, 170), (70, 70, 90), (180, 180, 170)]
_NON_SKIN = [(40, 90, 200), (40, 160, 70), (140, 60, 160), (200, 200, 60), (60, 170, 180), (220, 60, 60)]


def _luma(c) -> float:
    c = np.asarray(c, np.float32)
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _head_colors(rng):
    skin = _jitter(rng, _SKIN[rng.integers(len(_SKIN))], 12)
    hair = _jitter(rng, _HAIR[rng.integers(len(_HAIR))], 10)
    if _luma(hair) > 0.55 * _luma(skin):
        hair = hair * (0.55 * _luma(skin) / max(_luma(hair), 1.0))
    return skin, hair


def _paint_head(img, cx, cy, a, b, skin, hair) -> None:
    """Hair-coloured ellipse with the lower face ellipse in skin colour, shaded, with eyes."""
    h, w = img.shape[:2]
    c = _crop(cx, cy, a, b, w, h)
    if c is None:
        return
    x0, y0, x1, y1, xx, yy = c
    r2 = _ellipse_r2(xx, yy, cx, cy, a, b)
    head = r2 <= 1.0
    face = head & (_ellipse_r2(xx, yy, cx, cy + 0.24 * b, 0.86 * a, 0.84 * b) <= 1.0)
    shade = (1.0 - 0.2 * r2)[..., None]
    region = img[y0:y1, x0:x1]
    region[head] = (np.asarray(hair, np.float32)[None] * shade[head])
    region[face] = (np.asarray(skin, np.float32)[None] * shade[face])
    if a >= 6:
        eye = np.asarray(hair, np.float32) * 0.6
        for sx in (-1, 1):
            _paint_ellipse(img, cx + sx * 0.38 * a, cy + 0.1 * b, max(0.9, 0.1 * a), max(0.9, 0.07 * b), eye)


def _paint_distractor(img, rng, cx, cy, size) -> str:
    kind = ("skin_polygon", "hair_ball", "capped_non_skin", "polygon")[rng.integers(4)]
    if kind in ("skin_polygon", "polygon"):
        color = _jitter(rng, _SKIN[rng.integers(len(_SKIN))], 12) if kind == "skin_polygon" else _jitter(
            rng, _NON_SKIN[rng.integers(len(_NON_SKIN))], 25
        )
        k = int(rng.integers(3, 5))
        ang = np.sort(rng.uniform(0, 2 * np.pi, k)) if k == 3 else np.arange(4) * np.pi / 2 + rng.uniform(0, 1)
        rad = size * 0.5 * rng.uniform(0.7, 1.0, k)
        _paint_polygon(img, [(cx + r * math.cos(t), cy + r * math.sin(t)) for r, t in zip(rad, ang)], color)
    elif kind == "hair_ball":
        _paint_ellipse(img, cx, cy, size * 0.4, size * 0.45, _jitter(rng, _HAIR[rng.integers(len(_HAIR))], 8), 0.2)
    else:
        body = _jitter(rng, _NON_SKIN[rng.integers(len(_NON_SKIN))], 20)
        _paint_head(img, cx, cy, size * 0.4, size * 0.5, body, body * 0.4)
    return kind


def _heads_image(rng, w, h, n_heads, force_outside: bool, allow_outside: bool):
    scale = min(w, h) / 640.0
    img = _textured_background(rng, h, w, _jitter(rng, _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))], 20))
    for _ in range(int(rng.integers(1, 5))):
        size = float(np.exp(rng.uniform(np.log(20), np.log(140)))) * scale
        _paint_distractor(img, rng, rng.uniform(0, w), rng.uniform(0, h), size)
    heads: List[Tuple[float, float, float, float]] = []
    boxes: List[List[float]] = []
    outside = 0
    for k in range(n_heads):
        for _attempt in range(30):
            bh = float(np.exp(rng.uniform(np.log(20), np.log(160)))) * scale
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
            _paint_ellipse(img, cx, cy + 2.0 * b, 1.9 * a, 1.25 * b, _jitter(rng, (100, 100, 100), 90), 0.15)
    for (cx, cy, a, b), (skin, hair) in zip(heads, colors):
        _paint_head(img, cx, cy, a, b, skin, hair)
    return _to_u8(img), boxes, outside


def make_heads(
    out: Union[str, os.PathLike],
    n: int = 48,
    seed: int = 0,
    size: SizeArg = 640,
    overwrite: bool = False,
) -> dict:
    """Roboflow COCO export of a one-class head detection set (formats.md section 1).

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
    """
    n = _check_n(n, 4, "heads")
    w, h = _size2(size, "heads")
    root = _prepare_out(out, ("train", "valid", "test"), overwrite)
    wr = _Writer(root)
    splits = {"train": n, "valid": max(4, n // 4), "test": max(4, n // 4)}
    summary = {"kind": "heads", "out": str(root), "seed": int(seed), "image_size": [w, h], "splits": {}}
    for si, (split, count) in enumerate(splits.items()):
        images, anns = [], []
        stats = dict(images=count, annotations=0, heads=0, empty_images=0, degenerate_boxes=0,
                     boxes_partly_outside=0)
        for i in range(count):
            rng = _rng("heads", seed, si, i)
            empty = split != "test" and i % 12 == 3
            force_outside = split != "test" and i % 12 == 1
            n_heads = 0 if empty else int(rng.integers(1, 6))
            rgb, boxes, outside = _heads_image(rng, w, h, n_heads, force_outside, split != "test")
            token = hashlib.md5(f"{seed}-{split}-{i}".encode()).hexdigest()
            file_name = f"img_{i:04d}_jpg.rf.{token}.jpg"
            wr.jpeg(f"{split}/{file_name}", rgb)
            images.append({"id": i, "license": 1, "file_name": file_name, "height": h, "width": w,
                           "date_captured": "2023-03-14T10:57:47+00:00"})
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
                anns.append({"id": len(anns), "image_id": i, "category_id": 1, "bbox": box,
                             "area": round(box[2] * box[3], 2), "segmentation": [], "iscrowd": 0})
                stats["degenerate_boxes"] += int(box[2] <= 0 or box[3] <= 0)
            stats["heads"] += len(boxes)
            stats["empty_images"] += int(not rows)
            stats["boxes_partly_outside"] += outside
        stats["annotations"] = len(anns)
        doc = {
            "info": {"year": "2023", "version": "1", "description": "Exported from roboflow.com",
                     "contributor": "rat_plugins.data.synthetic", "url": "https://public.roboflow.com",
                     "date_created": "2023-03-14T10:57:47+00:00"},
            "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}],
            "categories": [dict(c) for c in HEADS_CATEGORIES],
            "images": images,
            "annotations": anns,
        }
        wr.json(f"{split}/_annotations.coco.json", doc)
        summary["splits"][split] = stats
    summary["files"] = wr.files
    return summary


# ----------------------------------------------------------------------------- isic


def _blob_radius(rng, r0: float, n_theta: int = 2048) -> np.ndarray:
    """Radius of an irregular blob on a grid of ``n_theta`` angles: harmonics 2..48 + spicules."""
    theta = np.linspace(0, 2 * np.pi, n_theta, endpoint=False)
    ks = np.arange(2, 49)
    amp = rng.standard_normal(ks.size) * ks ** -1.1
    amp *= rng.uniform(0.1, 0.2) / np.sqrt((amp ** 2).sum() / 2)
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
    c = _crop(cx, cy, rmax, rmax, w, h)
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
    mottle = _smooth_noise(rng, y1 - y0, x1 - x0, 5, 1)[..., 0] * 0.1
    dark = 0.78 + 0.22 * np.clip(rr / np.maximum(rb, 1e-6), 0, 1)
    col = np.asarray(color, np.float32)[None] * ((dark + mottle)[inside])[:, None]
    img[y0:y1, x0:x1][inside] = col
    if mask is not None:
        mask[y0:y1, x0:x1][inside] = 255


def _isic_image(rng, w, h):
    s = min(w, h)
    skin = _jitter(rng, (222, 168, 145), 14)
    img = _textured_background(rng, h, w, skin, texture=5.0, noise=5.0, cells=4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mask = np.zeros((h, w), np.uint8)
    lesion_color = _jitter(rng, (130, 80, 60), 18)
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
        _paint_blob(img, mask, rng, hcx + rad * math.cos(u), hcy + rad * math.sin(u), radius,
                    _jitter(rng, lesion_color, 8))
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
                _paint_blob(img, None, rng, cx, cy, radius, _jitter(rng, lesion_color, 10))
                n_distractors += 1
                break
    u8 = Image.fromarray(_to_u8(img), "RGB")
    draw = ImageDraw.Draw(u8)
    n_hairs = int(rng.integers(0, 4))
    for _ in range(n_hairs):  # hairs: thin dark quadratic curves, not part of the mask
        p0, p1, p2 = (rng.uniform(0, 1, 2) * (w, h) for _ in range(3))
        t = np.linspace(0, 1, 40)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        tone = int(rng.integers(30, 70))
        draw.line([tuple(p) for p in pts.tolist()], fill=(tone, tone - 10, tone - 15), width=1)
    rgb = np.asarray(u8).copy()
    vignette = bool(rng.random() < 0.3)
    if vignette:  # dark dermatoscope corners
        rv = rng.uniform(0.5, 0.56) * math.hypot(w, h)
        dc = np.hypot(xx - w / 2, yy - h / 2)
        rgb[dc > rv] = (rgb[dc > rv] * 0.08).astype(np.uint8)
    return rgb, mask, dict(lesions=n_lesions, distractors=n_distractors, hairs=n_hairs, vignette=int(vignette))


_ISIC_FOLDERS = {
    "Training": ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
    "Validation": ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
    "Test": ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
}


def make_isic(
    out: Union[str, os.PathLike],
    n: int = 24,
    seed: int = 0,
    size: SizeArg = (96, 320),
    overwrite: bool = False,
) -> dict:
    """ISIC 2018 Task 1 layout (formats.md section 2) with the halo rule of the module docstring.

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
    n = _check_n(n, 1, "isic")
    if isinstance(size, (int, np.integer)):
        lo = hi = int(size)
    else:
        lo, hi = (int(v) for v in size)
    if lo < 32 or hi < lo:
        raise ValueError(f"isic: size range must satisfy 32 <= lo <= hi, got {size!r}")
    owned = [f for pair in _ISIC_FOLDERS.values() for f in pair]
    root = _prepare_out(out, owned, overwrite)
    wr = _Writer(root)
    counts = {"Training": n, "Validation": max(4, n // 4), "Test": max(4, n // 4)}
    summary = {"kind": "isic", "out": str(root), "seed": int(seed), "size_range": [lo, hi], "splits": {}}
    id_rng = _rng("isic", seed, 99)
    next_id = 0
    for si, (split, count) in enumerate(counts.items()):
        in_dir, gt_dir = _ISIC_FOLDERS[split]
        stats = dict(images=count, masks=count, lesions=0, distractors=0, hairs=0, vignettes=0, sizes=[])
        for i in range(count):
            rng = _rng("isic", seed, si, i)
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
        wr.text(f"{in_dir}/ATTRIBUTION.txt",
                "Synthetic images written by rat_plugins.data.synthetic (no real patient data).\n")
        wr.text(f"{in_dir}/LICENSE.txt",
                "Synthetic data; the real ISIC 2018 images are CC-BY-NC 4.0, see the ISIC archive.\n")
        summary["splits"][split] = stats
    summary["files"] = wr.files
    return summary


# ----------------------------------------------------------------------------- fundus


def _vessel_tree(rng, od: Tuple[float, float], fov_c: Tuple[float, float], fov_r: float):
    """Branching random walks from the optic disc: list of (points, width, seen_by_observer_2)."""
    branches = []
    step = max(1.0, fov_r / 40.0)
    base = rng.uniform(0, 2 * np.pi)
    n_trunks = int(rng.integers(4, 7))
    stack = [((od[0], od[1]), base + 2 * np.pi * k / n_trunks + rng.uniform(-0.3, 0.3), 3, 2.2 * fov_r)
             for k in range(n_trunks)]
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
    base = _jitter(rng, (205, 95, 40), 15)
    falloff = (1.0 - 0.45 * (rr / fov_r) ** 2)[..., None]
    img = base[None, None] * falloff
    img = img + 8.0 * _smooth_noise(rng, h, w, 5, 3)
    d_od = np.hypot(xx - od[0], yy - od[1]) / (0.12 * fov_r)
    img += (np.exp(-d_od ** 2) * 1.0)[..., None] * np.asarray([45, 90, 60], np.float32)
    d_fv = np.hypot(xx - fovea[0], yy - fovea[1]) / (0.15 * fov_r)
    img *= (1.0 - 0.3 * np.exp(-d_fv ** 2))[..., None]
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
    return _to_u8(img), masks[0], masks[1], fov_mask, len(branches)


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
    n = _check_n(n, 1, "fundus")
    w, h = _size2(size, "fundus")
    owned = ("training", "test") if layout == "raw" else ("images", "annotations")
    root = _prepare_out(out, owned, overwrite)
    wr = _Writer(root)
    summary = {"kind": "fundus", "layout": layout, "out": str(root), "seed": int(seed),
               "image_size": [w, h], "splits": {}}
    n_test = max(2, n // 2)
    for si, (split, count, first_id) in enumerate((("training", n, 21), ("test", n_test, 1))):
        stats = dict(images=count, vessel_fraction=0.0, branches=0, second_observer=0)
        fracs = []
        for i in range(count):
            rng = _rng("fundus", seed, si, i)
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


# ----------------------------------------------------------------------------- events


def _occupancy(shape: str, cx: float, cy: float, ow: float, oh: float, xs: np.ndarray, ys: np.ndarray):
    """Fraction of each sensor pixel covered by the object, [H, W] float32."""
    if shape == "rect":
        ox = np.clip(np.minimum(xs + 1, cx + ow / 2) - np.maximum(xs, cx - ow / 2), 0, 1)
        oy = np.clip(np.minimum(ys + 1, cy + oh / 2) - np.maximum(ys, cy - oh / 2), 0, 1)
        return (oy[:, None] * ox[None, :]).astype(np.float32)
    a, b = ow / 2, oh / 2
    nx = ((xs + 0.5 - cx) / a)[None, :]
    ny = ((ys + 0.5 - cy) / b)[:, None]
    sd = (np.sqrt(nx ** 2 + ny ** 2) - 1.0) * min(a, b)
    return np.clip(0.5 - sd, 0, 1).astype(np.float32)


def _event_sequence(rng, sw: int, sh: int, frames: int, label_every: int, nbins: int = 10):
    """Histogram [frames, 2*nbins, sh//2, sw//2] (uint8) and labels per labelled representation."""
    scale = min(sw, sh) / 128.0
    xs, ys = np.arange(sw, dtype=np.float32), np.arange(sh, dtype=np.float32)
    objects = []
    for track in range(int(rng.integers(3, 7))):
        cls = int(rng.integers(len(EVENT_CLASSES)))
        shape, aspect, (lo, hi) = EVENT_CLASSES[cls]
        long_side = rng.uniform(lo, hi) * scale
        ow, oh = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
        mid = frames / 2
        pc = np.array([rng.uniform(0.1, 0.9) * sw, rng.uniform(0.1, 0.9) * sh])
        ang = rng.uniform(0, 2 * np.pi)
        v = rng.uniform(1.5, 6.0) * scale * np.array([math.cos(ang), math.sin(ang)])
        contrast = float(rng.choice([-1, 1]) * rng.uniform(0.5, 1.2))
        objects.append(dict(track=track, cls=cls, shape=shape, w=ow, h=oh, p0=pc - v * mid, v=v, c=contrast))

    def log_intensity(tau: float) -> np.ndarray:
        img = np.zeros((sh, sw), np.float32)
        for o in objects:
            cx, cy = o["p0"] + o["v"] * tau
            occ = _occupancy(o["shape"], cx, cy, o["w"], o["h"], xs, ys)
            img = img * (1 - occ) + o["c"] * occ
        return img

    threshold, noise_rate = 0.25, 0.002
    hot = [(int(rng.integers(sh)), int(rng.integers(sw))) for _ in range(2)]
    full = np.zeros((frames, 2 * nbins, sh, sw), np.uint16)
    prev = log_intensity(0.0)
    for i in range(frames):
        for b in range(nbins):
            cur = log_intensity(i + (b + 1) / nbins)
            delta = cur - prev
            prev = cur
            for pol, sign in ((0, -1.0), (1, 1.0)):
                ch = full[i, pol * nbins + b]
                change = np.maximum(sign * delta, 0.0)
                yx = np.nonzero(change > 1e-4)
                if yx[0].size:
                    ch[yx] += rng.poisson(change[yx] / threshold).astype(np.uint16)
                k = int(rng.poisson(noise_rate * sh * sw))
                np.add.at(ch, (rng.integers(0, sh, k), rng.integers(0, sw, k)), 1)
            for (hy, hx) in hot:
                full[i, nbins + b, hy, hx] += np.uint16(rng.poisson(0.8))
    full = np.minimum(full, 10)  # RVT's count_cutoff
    data = full[:, :, 1::2, 1::2].astype(np.uint8)  # nearest-exact downsampling by 2

    labelled = []
    truncated = 0
    for i in range(label_every - 1, frames, label_every):
        t_us = (i + 1) * 50000
        rows = []
        for o in objects:
            cx, cy = o["p0"] + o["v"] * (i + 1)
            x0, y0, x1, y1 = cx - o["w"] / 2, cy - o["h"] / 2, cx + o["w"] / 2, cy + o["h"] / 2
            cx0, cy0 = np.clip(x0, 0, sw - 1), np.clip(y0, 0, sh - 1)  # RVT's crop_to_fov_filter
            cx1, cy1 = np.clip(x1, 0, sw - 1), np.clip(y1, 0, sh - 1)
            bw, bh = cx1 - cx0, cy1 - cy0
            if bw < 5 or bh < 5:  # RVT's conservative_bbox_filter
                continue
            truncated += int((cx0, cy0, cx1, cy1) != (x0, y0, x1, y1))
            rows.append((t_us, cx0, cy0, bw, bh, o["cls"], 1.0, o["track"]))
        if rows:
            labelled.append((i, np.array(rows, dtype=RVT_LABEL_DTYPE)))
    return data, labelled, dict(objects=len(objects), truncated_boxes=truncated, hot_pixels=len(hot),
                                classes=sorted({o["cls"] for o in objects}),
                                min_object_side=round(float(min(min(o["w"], o["h"]) for o in objects)), 2))


def make_events(
    out: Union[str, os.PathLike],
    n: int = 2,
    seed: int = 0,
    size: SizeArg = 64,
    frames: int = 30,
    label_every: int = 2,
    overwrite: bool = False,
) -> dict:
    """RVT's preprocessed layout (formats.md section 6) with ``stacked_histogram_dt=50_nbins=10``.

    Per sequence: ``event_representations_v2/stacked_histogram_dt=50_nbins=10/
    event_representations_ds2_nearest.h5`` (``data`` uint8 [frames, 20, H, W]),
    ``objframe_idx_2_repr_idx.npy`` and ``timestamps_us.npy`` (``(i + 1) * 50000``), and
    ``labels_v2/labels.npz`` (``labels`` with ``RVT_LABEL_DTYPE``, ``objframe_idx_2_label_idx``)
    plus ``labels_v2/timestamps_us.npy`` (one per labelled frame). Representations
    ``label_every - 1, 2 * label_every - 1, ...`` are labelled when at least one object is visible
    (RVT drops frames whose labels were all filtered), so the frame list can have gaps. Labels are
    cropped to the sensor and filtered to sides >= 5 px as RVT's preprocessing does, and are in
    sensor pixels: ``2 * H`` by ``2 * W``.

    Args:
        out: dataset folder (``datasets/events/<name>``).
        n: train sequences (>= 1); val and test get ``max(1, n // 2)`` each.
        seed: random seed.
        size: histogram size, int or (width, height) (the sensor is twice that).
        frames: representations (50 ms windows) per sequence.
        label_every: label every k-th representation (>= 2: RVT's frames are >= 100 ms apart).
        overwrite: replace the ``train/ val/ test/`` folders of a non-empty ``out``.
    """
    n = _check_n(n, 1, "events")
    w, h = _size2(size, "events")
    frames, label_every = int(frames), int(label_every)
    if label_every < 2 or frames < label_every:
        raise ValueError(f"events: need label_every >= 2 and frames >= label_every, got {label_every}, {frames}")
    root = _prepare_out(out, ("train", "val", "test"), overwrite)
    wr = _Writer(root)
    sw, sh = 2 * w, 2 * h
    summary = {"kind": "events", "out": str(root), "seed": int(seed), "repr_name": EVENT_REPR_NAME,
               "histogram_hw": [h, w], "sensor_hw": [sh, sw], "label_scale": 2, "frames": frames,
               "label_every": label_every, "splits": {}}
    counts = {"train": n, "val": max(1, n // 2), "test": max(1, n // 2)}
    for si, (split, count) in enumerate(counts.items()):
        stats = dict(sequences=count, representations=0, labelled_frames=0, labels=0, truncated_boxes=0,
                     skipped_label_slots=0, hot_pixels=0, small_objects=0, classes=[])
        classes = set()
        for q in range(count):
            for attempt in range(10):
                rng = _rng("events", seed, si, q, attempt)
                data, labelled, info = _event_sequence(rng, sw, sh, frames, label_every)
                if labelled:
                    break
            else:  # pragma: no cover - ten empty draws in a row
                raise RuntimeError("events: could not draw a sequence with labels")
            seq = f"{split}/seq_{si}{q:03d}"
            ev_dir = f"{seq}/event_representations_v2/{EVENT_REPR_NAME}"
            repr_idx = np.array([i for i, _ in labelled], dtype=np.int64)
            labels = np.concatenate([rows for _, rows in labelled])
            starts = np.cumsum([0] + [len(rows) for _, rows in labelled[:-1]]).astype(np.int64)
            ts = ((np.arange(frames, dtype=np.int64) + 1) * 50000).astype(np.int64)
            wr.h5(f"{ev_dir}/{EVENT_H5_NAME}", data)
            wr.npy(f"{ev_dir}/objframe_idx_2_repr_idx.npy", repr_idx)
            wr.npy(f"{ev_dir}/timestamps_us.npy", ts)
            wr.npz(f"{seq}/labels_v2/labels.npz", labels=labels, objframe_idx_2_label_idx=starts)
            wr.npy(f"{seq}/labels_v2/timestamps_us.npy", ts[repr_idx])
            stats["representations"] += frames
            stats["labelled_frames"] += len(labelled)
            stats["labels"] += len(labels)
            stats["truncated_boxes"] += info["truncated_boxes"]
            stats["skipped_label_slots"] += len(range(label_every - 1, frames, label_every)) - len(labelled)
            stats["hot_pixels"] += info["hot_pixels"]
            stats["small_objects"] += int(np.sum((labels["w"] < 32) & (labels["h"] < 32)))
            classes.update(info["classes"])
        stats["classes"] = sorted(classes)
        summary["splits"][split] = stats
    summary["files"] = wr.files
    return summary


# ----------------------------------------------------------------------------- coco


def _circle(cx, cy, r, k=12):
    return [(cx + r * math.cos(2 * np.pi * j / k), cy + r * math.sin(2 * np.pi * j / k)) for j in range(k)]


# Silhouettes in template units (y down); each is a list of polygons.
_COCO_TEMPLATES = {
    1: [_circle(20, 10, 9, 10),
        [(8, 21), (32, 21), (40, 55), (34, 56), (30, 38), (30, 100), (22, 100), (20, 65), (18, 100),
         (10, 100), (10, 38), (6, 56), (0, 55)]],
    3: [[(0, 22), (4, 14), (24, 12), (34, 0), (68, 0), (80, 12), (97, 15), (100, 30), (100, 38), (0, 38)],
        _circle(22, 38, 8), _circle(78, 38, 8)],
    18: [[(20, 20), (75, 18), (80, 10), (88, 2), (96, 6), (100, 16), (92, 22), (86, 24), (84, 40), (80, 60),
          (74, 60), (72, 40), (32, 40), (30, 60), (24, 60), (22, 40), (14, 30), (4, 18), (2, 14), (10, 22)]],
}
_SIZE_RANGES = {"small": (150.0, 850.0), "medium": (1500.0, 7000.0), "large": (10500.0, 16000.0)}
_SIZE_MIN = {"small": 60.0, "medium": 1.15 * 32 ** 2, "large": 1.1 * 96 ** 2}


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
    img = _textured_background(rng, h, w, _jitter(rng, (128, 128, 128), 40), texture=18.0, noise=7.0)
    for _ in range(int(rng.integers(0, 4))):  # unlabelled clutter, drawn first
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(4, 18) * min(w, h) / 256
        _paint_polygon(img, [(x - r, y - r * 0.3), (x + r, y - r * 0.5), (x + r * 0.4, y + r)],
                       _jitter(rng, (128, 128, 128), 100))
    taken: List[List[float]] = []
    anns = []

    def free(box):
        x, y, bw, bh = box
        return all(x + bw + 2 <= ox or ox + ow + 2 <= x or y + bh + 2 <= oy or oy + oh + 2 <= y
                   for ox, oy, ow, oh in taken)

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
            color = _jitter(rng, (128, 128, 128), 110)
            for p in polys:
                _paint_polygon(img, p, color)
            mask = _poly_mask(w, h, polys)
            ys, xs = np.nonzero(mask)
            box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
            taken.append(box)
            anns.append(dict(category_id=1, iscrowd=1, segmentation=_rle(mask), area=float(mask.sum()),
                             bbox=box, size_class="crowd"))
    def spot(bw, bh, anchor):
        for _attempt in range(40):
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            if anchor:  # keep one side free for the rest of the plan
                y = min(rng.uniform(0, 0.04 * h), h - bh) if rng.random() < 0.5 else max(h - bh - rng.uniform(0, 0.04 * h), 0)
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
        color = _jitter(rng, (128, 128, 128), 110)
        for j, p in enumerate(polys):
            shade = 0.35 if (cat == 3 and j > 0) else 1.0  # dark wheels
            _paint_polygon(img, p, color * shade)
        mask = _poly_mask(w, h, polys)
        allp = np.concatenate([np.asarray(p) for p in polys])
        x0, y0 = allp.min(0)
        x1, y1 = allp.max(0)
        box = [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)]
        taken.append(box)
        anns.append(dict(category_id=cat, iscrowd=0, segmentation=[[c for xy in p for c in xy] for p in polys],
                         area=float(mask.sum()), bbox=box, size_class=size_class))
    return _to_u8(img), anns


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
    n = _check_n(n, 3, "coco")
    w, h = _size2(size, "coco")
    cats = [c["id"] for c in COCO_CATEGORIES]
    large_cats = [c for c in cats if _max_area(c, w, h) >= 1.15 * 96 ** 2]
    if not large_cats:
        raise ValueError(f"coco: images must be at least 192x192 so large (>= 96^2) objects fit, got {w}x{h}")
    root = _prepare_out(out, ("annotations", "train2017", "val2017"), overwrite)
    wr = _Writer(root)
    counts = {"train2017": n, "val2017": max(3, n // 3)}
    id_rng = _rng("coco", seed, 99)
    all_ids = id_rng.choice(np.arange(1, 581930), size=sum(counts.values()), replace=False)
    summary = {"kind": "coco", "out": str(root), "seed": int(seed), "image_size": [w, h], "splits": {}}
    offset = 0
    for si, (split, count) in enumerate(counts.items()):
        ids = sorted(int(v) for v in all_ids[offset:offset + count])
        offset += count
        images, anns = [], []
        stats = dict(images=count, annotations=0, empty_images=0, crowd=0, small=0, medium=0, large=0)
        for i, image_id in enumerate(ids):
            rng = _rng("coco", seed, si, i)
            if i == 0:
                plan: List[Tuple[int, str]] = []
            elif i == 1:
                plan = [(int(rng.choice(large_cats if c == "large" else cats)), c)
                        for c in ("large", "medium", "small")]
            else:
                k = int(rng.integers(1, 5))
                classes = rng.choice(["small", "medium", "large"], size=k, p=[0.45, 0.35, 0.2])
                plan = sorted(((int(rng.choice(large_cats if c == "large" else cats)), str(c)) for c in classes),
                              key=lambda cs: ("large", "medium", "small").index(cs[1]))
            rgb, objs = _coco_image(rng, w, h, plan, crowd=(i == 2))
            file_name = f"{image_id:012d}.jpg"
            wr.jpeg(f"{split}/{file_name}", rgb)
            images.append({"license": 1, "file_name": file_name,
                           "coco_url": f"http://images.cocodataset.org/{split}/{file_name}",
                           "height": h, "width": w, "date_captured": "2013-11-14 11:18:45",
                           "flickr_url": "", "id": image_id})
            for o in objs:
                ann_id = (si + 1) * 1_000_000 + len(anns) + 1
                anns.append({"segmentation": o["segmentation"], "area": o["area"], "iscrowd": o["iscrowd"],
                             "image_id": image_id, "bbox": o["bbox"], "category_id": o["category_id"],
                             "id": ann_id})
                if o["iscrowd"]:
                    stats["crowd"] += 1
                else:
                    key = "small" if o["area"] < 32 ** 2 else "medium" if o["area"] < 96 ** 2 else "large"
                    stats[key] += 1
            stats["empty_images"] += int(not objs)
        stats["annotations"] = len(anns)
        doc = {
            "info": {"description": "Synthetic COCO-2017-layout set (rat_plugins.data.synthetic)",
                     "url": "http://cocodataset.org", "version": "1.0", "year": 2017,
                     "contributor": "rat_plugins", "date_created": "2017/09/01"},
            "licenses": [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 1,
                          "name": "Attribution License"}],
            "images": images,
            "annotations": anns,
            "categories": [dict(c) for c in COCO_CATEGORIES],
        }
        wr.json(f"annotations/instances_{split}.json", doc)
        summary["splits"][split] = stats
    summary["files"] = wr.files
    return summary


# ----------------------------------------------------------------------------- command line

GENERATORS: Dict[str, Callable[..., dict]] = {
    "heads": make_heads,
    "isic": make_isic,
    "fundus": make_fundus,
    "events": make_events,
    "coco": make_coco,
}


def _parse_size(text: str) -> Union[int, Tuple[int, int]]:
    for sep in ("x", "X", ","):
        if sep in text:
            a, b = text.split(sep, 1)
            return int(a), int(b)
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rat_plugins.data.synthetic",
        description="Write a small deterministic synthetic dataset in a real layout; prints a JSON summary.",
    )
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind, fn in GENERATORS.items():
        p = sub.add_parser(kind, help=(fn.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--out", required=True, help="dataset folder to create (must be empty or absent)")
        p.add_argument("--n", type=int, default=None, help="size of the first split (default: see docs)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size", type=_parse_size, default=None,
                       help="N or WxH (isic: LO,HI range of widths/heights)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace this layout's folders inside a non-empty --out")
        if kind == "fundus":
            p.add_argument("--layout", choices=("raw", "mmseg"), default="raw")
        if kind == "events":
            p.add_argument("--frames", type=int, default=30, help="representations per sequence")
            p.add_argument("--label-every", type=int, default=2, help="label every k-th representation")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    kwargs = dict(seed=args.seed, overwrite=args.overwrite)
    if args.n is not None:
        kwargs["n"] = args.n
    if args.size is not None:
        kwargs["size"] = args.size
    if args.kind == "fundus":
        kwargs["layout"] = args.layout
    if args.kind == "events":
        kwargs.update(frames=args.frames, label_every=args.label_every)
    try:
        summary = GENERATORS[args.kind](args.out, **kwargs)
    except (DatasetExistsError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
