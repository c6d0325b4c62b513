"""Pieces every synthetic family shares: seeding, the output folder, the file writer, drawing."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import zipfile
from pathlib import Path
from typing import Iterable, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from ...utils.atomic import atomic_path, atomic_write_bytes

SizeArg = Union[int, Sequence[int]]

JPEG_QUALITY = 90

# One salt per family, so that two families drawn with the same seed do not share numbers.
_SALT = {
    "heads": 101,
    "isic": 202,
    "fundus": 303,
    "events": 404,
    "coco": 505,
    "isic_context": 606,
    "isic_radius": 707,
    "events_memory": 808,
}


class DatasetExistsError(FileExistsError):
    """The output folder is not empty and ``overwrite`` was not given."""


# ----------------------------------------------------------------------------- seeding and checks


def item_rng(kind: str, seed: int, *keys: int) -> np.random.Generator:
    """One independent generator per (kind, seed, split, item): items do not depend on ``n``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SALT[kind], *map(int, keys)]))


def image_size(size: SizeArg, name: str) -> Tuple[int, int]:
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


def check_n(n: int, minimum: int, name: str) -> int:
    n = int(n)
    if n < minimum:
        raise ValueError(f"{name}: n must be at least {minimum} (so every imperfection fits), got {n}")
    return n


# ----------------------------------------------------------------------------- writing


def prepare_out(out: Union[str, os.PathLike], owned: Iterable[str], overwrite: bool) -> Path:
    """Create ``out``; a non-empty one only with ``overwrite``, which removes just ``owned``."""
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


class Writer:
    """Writes files under ``root`` atomically, with fixed encoder settings, and counts them."""

    def __init__(self, root: Path):
        self.root = root
        self.files = 0

    def bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.root / rel, data)
        self.files += 1

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
        from ..._optional import require

        h5py = require("h5py", "rat_plugins.data.synthetic (events)")
        with atomic_path(self.root / rel) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset(
                "data",
                data=data,
                chunks=(1,) + tuple(data.shape[1:]),
                maxshape=(None,) + tuple(data.shape[1:]),
                compression="gzip",
                compression_opts=4,
                track_times=False,
            )
        self.files += 1


# ----------------------------------------------------------------------------- drawing


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (pos - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), i0] += 1 - frac
    m[np.arange(n_out), i1] += frac
    return m


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise, roughly unit variance, [h, w, channels] (bilinear upsampling)."""
    ch = max(2, int(round(cells * h / max(h, w))) + 1)
    cw = max(2, int(round(cells * w / max(h, w))) + 1)
    grid = rng.standard_normal((ch, cw, channels)).astype(np.float32)
    mh, mw = _interp_matrix(h, ch), _interp_matrix(w, cw)
    rows = np.tensordot(mh, grid, axes=(1, 0))  # [h, cw, c]
    return np.ascontiguousarray(np.tensordot(rows, mw, axes=(1, 1)).transpose(0, 2, 1))  # [h, w, c]


def pixel_grid(cx: float, cy: float, rx: float, ry: float, w: int, h: int):
    """The image crop around a shape of radii (rx, ry) and its pixel centres, or None if outside."""
    x0, x1 = max(0, int(math.floor(cx - rx)) - 1), min(w, int(math.ceil(cx + rx)) + 2)
    y0, y1 = max(0, int(math.floor(cy - ry)) - 1), min(h, int(math.ceil(cy + ry)) + 2)
    if x0 >= x1 or y0 >= y1:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    return x0, y0, x1, y1, xx, yy


def ellipse_r2(xx, yy, cx, cy, a, b):
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2


def ellipse_window(img: np.ndarray, cx, cy, a, b):
    """``(region, xx, yy, r2)`` over the ellipse's bounding box (``region`` a view of ``img``, ``r2``
    the normalised squared radius, <= 1 inside), or None when the box lies outside the image."""
    h, w = img.shape[:2]
    c = pixel_grid(cx, cy, a, b, w, h)
    if c is None:
        return None
    x0, y0, x1, y1, xx, yy = c
    return img[y0:y1, x0:x1], xx, yy, ellipse_r2(xx, yy, cx, cy, a, b)


def paint_ellipse(img: np.ndarray, cx, cy, a, b, color, shade: float = 0.0) -> None:
    window = ellipse_window(img, cx, cy, a, b)
    if window is None:
        return
    region, _, _, r2 = window
    m = r2 <= 1.0
    region[m] = np.asarray(color, np.float32)[None, :] * (1.0 - shade * r2[m])[:, None]


def polygon_mask(w: int, h: int, polys: Sequence[Sequence[Tuple[float, float]]]) -> np.ndarray:
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    for p in polys:
        d.polygon([(float(x), float(y)) for x, y in p], fill=255)
    return np.asarray(m) > 0


def paint_polygon(img: np.ndarray, pts: Sequence[Tuple[float, float]], color) -> None:
    h, w = img.shape[:2]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, y0 = max(0, int(min(xs)) - 1), max(0, int(min(ys)) - 1)
    x1, y1 = min(w, int(max(xs)) + 2), min(h, int(max(ys)) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    m = polygon_mask(x1 - x0, y1 - y0, [[(x - x0, y - y0) for x, y in pts]])
    img[y0:y1, x0:x1][m] = np.asarray(color, np.float32)


def to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def textured_background(rng, h, w, base, texture=22.0, noise=9.0, cells=6) -> np.ndarray:
    img = np.empty((h, w, 3), np.float32)
    img[:] = np.asarray(base, np.float32)
    img += texture * smooth_noise(rng, h, w, cells, 1)  # brightness
    img += texture * 0.4 * smooth_noise(rng, h, w, cells, 3)  # some colour
    img += texture * 0.5 * smooth_noise(rng, h, w, cells * 4, 1)
    img += (rng.random((h, w, 3), dtype=np.float32) - 0.5) * (noise * math.sqrt(12.0))  # std = noise
    return img


def jitter(rng, color, amount) -> np.ndarray:
    return np.clip(np.asarray(color, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)
