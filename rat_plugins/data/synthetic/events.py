"""Synthetic event-camera detection set in RVT's preprocessed layout (``events``).

Objects of 8 classes (class = shape + aspect ratio, ``EVENT_CLASSES``) move linearly over a static
background; the 20-channel stacked histogram counts brightness-change events (polarity 0 = OFF,
1 = ON; channel = polarity * 10 + bin) at the moving edges, clipped at 10, plus background noise
and hot pixels. As in RVT's ``*_ds2_nearest.h5`` files the histogram is the sensor grid
downsampled by 2 (nearest) and the **labels are in sensor pixels** (twice the histogram size); RVT
halves them when reading. See docs/formats.md, RVT preprocessed events.
"""

from __future__ import annotations

import math
import os
from typing import Union

import numpy as np

from ..rvt_events import DEFAULT_REPR_NAME, REPR_FILE_DS2
from ._common import SizeArg, Writer, check_n, image_size, item_rng, prepare_out

__all__ = ["make_events", "make_events_memory", "EVENT_CLASSES", "EVENT_REPR_NAME", "EVENT_H5_NAME", "RVT_LABEL_DTYPE"]

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
EVENT_REPR_NAME = DEFAULT_REPR_NAME
EVENT_H5_NAME = REPR_FILE_DS2


def _occupancy(shape: str, cx: float, cy: float, ow: float, oh: float, xs: np.ndarray, ys: np.ndarray):
    """Fraction of each sensor pixel covered by the object, [H, W] float32."""
    if shape == "rect":
        ox = np.clip(np.minimum(xs + 1, cx + ow / 2) - np.maximum(xs, cx - ow / 2), 0, 1)
        oy = np.clip(np.minimum(ys + 1, cy + oh / 2) - np.maximum(ys, cy - oh / 2), 0, 1)
        return (oy[:, None] * ox[None, :]).astype(np.float32)
    a, b = ow / 2, oh / 2
    nx = ((xs + 0.5 - cx) / a)[None, :]
    ny = ((ys + 0.5 - cy) / b)[:, None]
    sd = (np.sqrt(nx**2 + ny**2) - 1.0) * min(a, b)
    return np.clip(0.5 - sd, 0, 1).astype(np.float32)


def _write_sequence(wr, seq: str, data: np.ndarray, labelled) -> np.ndarray:
    """One recording in RVT's layout: the ds2 histogram, the label index and the labels (returned)."""
    frames = len(data)
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
    return labels


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
            for hy, hx in hot:
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
    return (
        data,
        labelled,
        dict(
            objects=len(objects),
            truncated_boxes=truncated,
            hot_pixels=len(hot),
            classes=sorted({o["cls"] for o in objects}),
            min_object_side=round(float(min(min(o["w"], o["h"]) for o in objects)), 2),
        ),
    )


def make_events(
    out: Union[str, os.PathLike],
    n: int = 2,
    seed: int = 0,
    size: SizeArg = 64,
    frames: int = 30,
    label_every: int = 2,
    overwrite: bool = False,
) -> dict:
    """RVT's preprocessed layout with ``stacked_histogram_dt=50_nbins=10`` (docs/formats.md, RVT preprocessed events).

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
    n = check_n(n, 1, "events")
    w, h = image_size(size, "events")
    frames, label_every = int(frames), int(label_every)
    if label_every < 2 or frames < label_every:
        raise ValueError(f"events: need label_every >= 2 and frames >= label_every, got {label_every}, {frames}")
    root = prepare_out(out, ("train", "val", "test"), overwrite)
    wr = Writer(root)
    sw, sh = 2 * w, 2 * h
    summary = {
        "kind": "events",
        "out": str(root),
        "seed": int(seed),
        "repr_name": EVENT_REPR_NAME,
        "histogram_hw": [h, w],
        "sensor_hw": [sh, sw],
        "label_scale": 2,
        "frames": frames,
        "label_every": label_every,
        "splits": {},
    }
    counts = {"train": n, "val": max(1, n // 2), "test": max(1, n // 2)}
    for si, (split, count) in enumerate(counts.items()):
        stats = dict(
            sequences=count,
            representations=0,
            labelled_frames=0,
            labels=0,
            truncated_boxes=0,
            skipped_label_slots=0,
            hot_pixels=0,
            small_objects=0,
            classes=[],
        )
        classes = set()
        for q in range(count):
            for attempt in range(10):
                rng = item_rng("events", seed, si, q, attempt)
                data, labelled, info = _event_sequence(rng, sw, sh, frames, label_every)
                if labelled:
                    break
            else:  # pragma: no cover - ten empty draws in a row
                raise RuntimeError("events: could not draw a sequence with labels")
            labels = _write_sequence(wr, f"{split}/seq_{si}{q:03d}", data, labelled)
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


def make_events_memory(
    out: Union[str, os.PathLike],
    n: int = 32,
    seed: int = 0,
    size: SizeArg = 32,
    frames: int = 8,
    emit: int = 2,
    overwrite: bool = False,
) -> dict:
    """Recordings whose object stops emitting events: RVT's memory control, RVT's layout (``events-memory``).

    One square object (class 0, side 3/8 of the histogram's shorter side) per recording, still, at a
    random place. It emits events (Poisson counts of mean 2 in every channel over its box) in the
    first ``emit`` representations and none after (no noise anywhere), and stays labelled. Labelled
    frames are every second representation from ``emit + 2`` on, so a zero-state clip of the last
    two representations before a labelled frame holds no event of the object: only a model that
    carries its state from the recording's start can find it there.

    Args:
        out: dataset folder; ``train`` gets ``n`` recordings, ``val`` and ``test`` ``max(1, n // 2)``.
        seed: random seed.
        size: histogram size, int or (width, height) (the sensor, and the labels, are twice that).
        frames: representations per recording (> ``emit + 2``).
        emit: representations with events.
    """
    n = check_n(n, 1, "events-memory")
    w, h = image_size(size, "events-memory")
    frames, emit = int(frames), int(emit)
    if emit < 1 or frames <= emit + 2:
        raise ValueError(f"events-memory: need emit >= 1 and frames > emit + 2, got emit {emit}, frames {frames}")
    root = prepare_out(out, ("train", "val", "test"), overwrite)
    wr = Writer(root)
    side = max(4, round(3 * min(w, h) / 8))
    labelled_reprs = list(range(emit + 2, frames, 2))
    summary = dict(
        kind="events-memory",
        out=str(root),
        seed=int(seed),
        histogram_hw=[h, w],
        sensor_hw=[2 * h, 2 * w],
        frames=frames,
        emit=emit,
        object_side=side,
        labelled_representations=labelled_reprs,
        splits={},
    )
    counts = {"train": n, "val": max(1, n // 2), "test": max(1, n // 2)}
    for si, (split, count) in enumerate(counts.items()):
        for q in range(count):
            rng = item_rng("events_memory", seed, si, q)
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            data = np.zeros((frames, 20, h, w), np.uint8)
            data[:emit, :, y : y + side, x : x + side] = np.minimum(rng.poisson(2.0, (emit, 20, side, side)), 10)
            box = (2 * x, 2 * y, 2 * side, 2 * side)  # sensor pixels
            labelled = [
                (i, np.array([((i + 1) * 50000, *box, 0, 1.0, 0)], dtype=RVT_LABEL_DTYPE)) for i in labelled_reprs
            ]
            _write_sequence(wr, f"{split}/seq_{si}{q:03d}", data, labelled)
        summary["splits"][split] = dict(sequences=count, labelled_frames=count * len(labelled_reprs))
    summary["files"] = wr.files
    return summary
