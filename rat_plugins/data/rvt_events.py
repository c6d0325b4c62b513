"""Random-access clips from RVT's preprocessed event layout (eTraM, Gen1, 1Mpx).

One sample per labelled frame: the representations ending at it, with its boxes. Layout and label
fields: docs/formats.md, "RVT preprocessed events". HDF5 files are opened lazily in each process
(DataLoader workers open their own handles); Blosc-compressed downloads need ``hdf5plugin``.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._optional import require
from .validate import DataError, MissingDataError, UnreadableDataError, cached_check, check_mode, first_few

__all__ = ["RVTEventClips", "EventSequence", "REPR_FILE", "REPR_FILE_DS2", "DEFAULT_REPR_NAME"]

REPR_FILE = "event_representations.h5"
REPR_FILE_DS2 = "event_representations_ds2_nearest.h5"
DEFAULT_REPR_NAME = "stacked_histogram_dt=50_nbins=10"
_SHORT_CLIP_RULES = ("pad", "drop")
SAMPLING_MODES = ("random", "streaming")
_READ_BLOCK = 64  # representations read at a time by the full check
logger = logging.getLogger(__name__)


@dataclass
class EventSequence:
    """One recording of a split: its files and the label index (small arrays, loaded eagerly)."""

    name: str
    h5_path: Path
    labels_path: Path
    num_representations: int
    frame_repr_idx: np.ndarray  # [K] representation index of labelled frame k (increasing)
    frame_label_start: np.ndarray  # [K + 1] label rows of frame k: start[k]:start[k + 1]
    labels: np.ndarray  # RVT's structured label records
    usable: np.ndarray  # [N] bool: the box has a positive size and overlaps the sensor

    def frame_rows(self, k: int) -> np.ndarray:
        """Every label record of labelled frame k (unusable boxes included)."""
        return self.labels[self.frame_label_start[k] : self.frame_label_start[k + 1]]

    def frame_labels(self, k: int) -> np.ndarray:
        """The usable boxes of labelled frame k."""
        start, end = self.frame_label_start[k], self.frame_label_start[k + 1]
        return self.labels[start:end][self.usable[start:end]]


def _missing_filters(dataset) -> List[str]:
    """Names of the HDF5 filters ``dataset`` is compressed with that this process cannot decode."""
    import h5py

    plist = dataset.id.get_create_plist()
    missing = []
    for i in range(plist.get_nfilters()):
        code, _flags, _values, name = plist.get_filter(i)
        if not h5py.h5z.filter_avail(code):
            missing.append(f"{name.decode(errors='replace') or 'unnamed'} (id {code})")
    return missing


def _open_h5(path: Path, where: str = "RVT events"):
    """Open a representation file read-only and return ``(file, dataset 'data')`` with clear errors."""
    h5py = require("h5py", "rat_plugins.data.rvt_events")
    try:  # registers Blosc / LZ4 / Zstd filters; the gzip-compressed synthetic files do not need it
        import hdf5plugin  # noqa: F401
    except ImportError:
        hdf5plugin = None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UnreadableDataError(
            f"{where}: cannot open the HDF5 file '{path}' ({e}); it is corrupt or truncated: "
            "copy it again or re-run RVT's preprocessing for this sequence"
        ) from e
    if "data" not in f:
        keys = list(f.keys())
        f.close()
        raise UnreadableDataError(
            f"{where}: '{path}' has no dataset 'data' (found {keys}); it is not an RVT representation file: "
            "copy it again or re-run RVT's preprocessing for this sequence"
        )
    dset = f["data"]
    missing = _missing_filters(dset)
    if missing:
        f.close()
        hint = "`pip install hdf5plugin`" if hdf5plugin is None else "an hdf5plugin version that provides these filters"
        raise ImportError(
            f"'{path}' is compressed with HDF5 filter(s) {', '.join(missing)} that this "
            f"installation cannot decode. To fix: {hint}."
        )
    if dset.ndim != 4:
        shape = dset.shape
        f.close()
        raise UnreadableDataError(
            f"{where}: '{path}': 'data' must be [T, C, H, W], got shape {shape}; re-run RVT's preprocessing"
        )
    return f, dset


def _read_all(path: Path, where: str) -> None:
    """Read every representation of a file once (the full check): a damaged chunk is an error now."""
    f, dset = _open_h5(path, where)
    try:
        for start in range(0, dset.shape[0], _READ_BLOCK):
            try:
                dset[start : start + _READ_BLOCK]
            except OSError as e:
                raise UnreadableDataError(
                    f"{where}: cannot read representations {start}..{min(start + _READ_BLOCK, dset.shape[0]) - 1} "
                    f"of '{path}' ({e}); the file is corrupt: copy it again or re-run RVT's preprocessing"
                ) from e
    finally:
        f.close()


def _load_npz(path: Path, keys: Sequence[str], where: str = "RVT events") -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{where}: '{path}' lacks {missing} (has {npz.files}); expected RVT's labels_v2 layout")
            return {k: npz[k] for k in keys}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        if isinstance(e, DataError):
            raise
        raise UnreadableDataError(
            f"{where}: cannot read '{path}' ({e}); copy it again or re-run RVT's preprocessing"
        ) from e


class RVTEventClips:
    """Clips of L event representations ending at labelled frames of one split.

    Args:
        root: dataset folder holding the splits, e.g. ``dataset_root() / "events/etram"``.
        split: ``train`` / ``val`` / ``test``.
        class_names: names of the class ids 0..K-1 (eTraM has 8), taken from the config.
        repr_name: folder under ``event_representations_v2``.
        downsample: True reads ``event_representations_ds2_nearest.h5`` (half the sensor size,
            boxes scaled by 0.5), False ``event_representations.h5`` (sensor size, boxes as stored).
        sequence_length: L, representations per clip.
        short_clips: ``"pad"`` (zero-pad in front, mask them invalid) or ``"drop"`` (skip labelled
            frames with fewer than L representations before them).
        all_labels: also return the boxes of every labelled frame inside the clip (per step).
        sequences: optional subset of sequence folder names (default: every folder of the split).
        sampling: ``"random"`` (default): each sample is a clip of the L representations ending at a
            labelled frame, from a zero state (RVT's random-access sampling). ``"streaming"``: RVT's
            streaming evaluation; each sample is the *segment* of a recording after the previous
            labelled frame up to and including this one (from representation 0 for the first
            labelled frame), so the segments of a recording, in order, stream it from its first
            representation to its last labelled one, and a model that carries its state from
            segment to segment sees what RVT's streaming sees at every labelled frame (the
            representations after the last labelled frame change no scored detection).
            Segments have different lengths (``sequence_length`` and ``short_clips`` do not
            apply); ``is_first`` is True only at representation 0, ``stream_end`` on the last
            segment of a recording. :meth:`stream_order` lists each recording's segments.
        check: ``header`` (default ``$RAT_DATA_CHECK``, else header: every file opens, labels and
            indices agree) or ``full`` (also reads every representation once; cached by the files'
            sizes and modification times, see ``rat_plugins.data.validate``).
        log: the logger for the data warnings (default: this module's).

    Boxes of zero / negative size or outside the sensor are dropped, counted and reported at
    WARNING with the first few (sequence, label row). Problems are a
    :class:`~rat_plugins.data.validate.DataError` naming the split, the file and the fix.

    Clips at a sequence start (fewer than L representations before the labelled frame) are
    front-padded with zero histograms (``valid`` False there) or dropped, as RVT's random-access
    dataset does. ``is_first`` is True at the first valid step: a random-access clip has no history,
    so the recurrent state is zeroed there (``MaxViTRNN.forward_clip(..., valid=valid,
    is_first=is_first)``) and the padding never reaches it; ``starts_sequence`` says whether that
    step is also representation 0 of the recording. Boxes are xyxy in pixels of the histogram read
    (labels are stored in sensor pixels: halved for the ``*_ds2_nearest`` file, as RVT does).

    Each sample (:meth:`__getitem__`) is a dict: ``clip`` uint8 [L, C, H, W] (unnormalised
    counts), ``valid`` / ``is_first`` / ``labelled`` bool [L], ``repr_indices`` int64 [L] (-1 on
    padding), ``starts_sequence`` bool, ``bboxes`` float32 [N, 4] xyxy and ``labels`` int64 [N] of
    the final frame, ``sequence``, ``objframe_idx``, ``repr_idx``, ``timestamp_us``; with
    ``all_labels`` also ``step_bboxes`` / ``step_labels`` (lists of L arrays, empty where a step
    has no label).
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        split: str,
        class_names: Sequence[str],
        repr_name: str = DEFAULT_REPR_NAME,
        downsample: bool = True,
        sequence_length: int = 5,
        short_clips: str = "pad",
        all_labels: bool = False,
        sequences: Optional[Sequence[str]] = None,
        check: Optional[str] = None,
        log: Optional[logging.Logger] = None,
        sampling: str = "random",
    ):
        self.where = f"RVT {split} split"
        if sampling not in SAMPLING_MODES:
            raise DataError(f"{self.where}: sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        self.sampling = sampling
        if not class_names:
            raise DataError(
                f"{self.where}: class_names is empty: pass the dataset's class names from the config "
                "(e.g. the 8 eTraM classes), index i naming class id i"
            )
        if int(sequence_length) < 1:
            raise DataError(f"{self.where}: sequence_length must be >= 1, got {sequence_length}")
        if short_clips not in _SHORT_CLIP_RULES:
            raise DataError(f"{self.where}: short_clips must be one of {_SHORT_CLIP_RULES}, got {short_clips!r}")
        self.root = Path(root)
        self.split = split
        self.class_names = tuple(str(c) for c in class_names)
        self.repr_name = repr_name
        self.downsample = bool(downsample)
        self.h5_name = REPR_FILE_DS2 if self.downsample else REPR_FILE
        self.label_scale = 0.5 if self.downsample else 1.0
        self.sequence_length = int(sequence_length)
        self.short_clips = short_clips
        self.all_labels = bool(all_labels)
        self.check = check_mode(check)

        split_dir = self.root / split
        if not split_dir.is_dir():
            have = sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
            raise MissingDataError(
                f"{self.where}: split folder '{split_dir}' does not exist "
                f"(found {have or 'nothing'} in '{self.root}'); place RVT's preprocessed train/ val/ test/ "
                "folders there (datasets/README.md, events) or write a synthetic set: "
                f"python -m rat_plugins.data.synthetic events --out {self.root}"
            )
        names = sorted(p.name for p in split_dir.iterdir() if p.is_dir()) if sequences is None else list(sequences)
        if not names:
            raise MissingDataError(
                f"{self.where}: split folder '{split_dir}' holds no sequence folders; the split is empty: "
                "copy its sequences there (RVT's preprocessed layout) or drop the split from the config"
            )
        self._chw: Optional[Tuple[int, ...]] = None
        self.sequences: List[EventSequence] = [self._load_sequence(split_dir / n) for n in names]
        self.channels, self.height, self.width = self._chw
        self._report_unusable_boxes(log or logger)
        if self.check == "full":
            self._read_every_representation()

        # One sample per labelled frame: (sequence index, labelled frame index).
        first_full = self.sequence_length - 1
        self._index: List[Tuple[int, int]] = [
            (s, k)
            for s, seq in enumerate(self.sequences)
            for k, r in enumerate(seq.frame_repr_idx)
            if short_clips == "pad" or r >= first_full or sampling == "streaming"
        ]
        if not self._index:
            rule = (
                " with sequence_length representations before them (short_clips='drop')"
                if short_clips == "drop"
                else ""
            )
            raise DataError(
                f"{self.where}: '{split_dir}' has no labelled frame{rule}; the split is empty: "
                "check labels_v2/ and objframe_idx_2_repr_idx.npy of its sequences"
                + (", or use short_clips='pad'" if short_clips == "drop" else "")
            )
        self._handles: Dict[int, object] = {}
        self._owner_pid = os.getpid()

    # ------------------------------------------------------------------ discovery (no h5 kept open)

    def _load_sequence(self, seq_dir: Path) -> EventSequence:
        where = self.where
        repr_dir = seq_dir / "event_representations_v2" / self.repr_name
        if not repr_dir.is_dir():
            parent = repr_dir.parent
            have = sorted(p.name for p in parent.iterdir()) if parent.is_dir() else []
            raise MissingDataError(
                f"{where}: representation folder '{repr_dir}' does not exist (found {have or 'nothing'} in "
                f"'{parent}'); set repr_name to one of those, or preprocess this representation with RVT's "
                "scripts/genx/preprocess_dataset.py"
            )
        h5_path = repr_dir / self.h5_name
        if not h5_path.is_file():
            other = REPR_FILE if self.downsample else REPR_FILE_DS2
            fix = (
                f"set downsample={not self.downsample} to read '{other}', which is there"
                if (repr_dir / other).is_file()
                else "copy it again or preprocess it with RVT's scripts"
            )
            raise MissingDataError(f"{where}: '{h5_path}' does not exist; {fix}")
        repr_idx_path = repr_dir / "objframe_idx_2_repr_idx.npy"
        labels_path = seq_dir / "labels_v2" / "labels.npz"
        for p in (repr_idx_path, labels_path):
            if not p.is_file():
                raise MissingDataError(
                    f"{where}: '{p}' does not exist; the sequence '{seq_dir}' is incomplete "
                    "(RVT's layout needs it next to the representations): copy it again"
                )
        try:
            frame_repr_idx = np.load(repr_idx_path, allow_pickle=False).astype(np.int64)
        except (OSError, ValueError, EOFError) as e:
            raise UnreadableDataError(
                f"{where}: cannot read '{repr_idx_path}' ({e}); copy it again or re-run RVT's preprocessing"
            ) from e
        npz = _load_npz(labels_path, ("labels", "objframe_idx_2_label_idx"), where)
        labels, starts = npz["labels"], npz["objframe_idx_2_label_idx"].astype(np.int64)
        for field in ("x", "y", "w", "h", "class_id"):
            if labels.dtype.names is None or field not in labels.dtype.names:
                raise DataError(
                    f"{where}: '{labels_path}': 'labels' lacks field '{field}' (has {labels.dtype.names}); "
                    "expected RVT's labels_v2 layout"
                )
        if len(starts) != len(frame_repr_idx):
            raise DataError(
                f"{where}: '{labels_path}' indexes {len(starts)} labelled frames but '{repr_idx_path}' "
                f"{len(frame_repr_idx)}; the two files come from different preprocessing runs: preprocess "
                "the sequence again"
            )
        if len(frame_repr_idx) and np.any(np.diff(frame_repr_idx) <= 0):
            raise DataError(f"{where}: '{repr_idx_path}' is not strictly increasing; preprocess the sequence again")
        if len(starts) and (np.any(np.diff(starts) < 0) or starts[0] < 0 or starts[-1] > len(labels)):
            raise DataError(
                f"{where}: '{labels_path}': objframe_idx_2_label_idx does not index its {len(labels)} labels "
                "in order; preprocess the sequence again"
            )
        if len(labels):
            class_ids = labels["class_id"].astype(np.int64)
            bad = class_ids[(class_ids < 0) | (class_ids >= len(self.class_names))]
            if len(bad):
                raise DataError(
                    f"{where}: '{labels_path}' has class id {int(bad[0])} but class_names has "
                    f"{len(self.class_names)} names {self.class_names}; give class_names for every id of "
                    "this dataset in the config (metainfo=dict(classes=...)) and the head's num_classes to match"
                )

        # Read the shape only and close again, so no handle exists when DataLoader workers fork.
        f, dset = _open_h5(h5_path, where)
        try:
            shape = tuple(int(v) for v in dset.shape)
        finally:
            f.close()
        if len(frame_repr_idx) and (frame_repr_idx[0] < 0 or frame_repr_idx[-1] >= shape[0]):
            raise DataError(
                f"{where}: '{repr_idx_path}' points at representation {frame_repr_idx[-1]} but '{h5_path}' holds "
                f"{shape[0]}; the file is truncated or from another run: copy it again or preprocess again"
            )
        if self._chw is None:
            self._chw = shape[1:]
        elif self._chw != shape[1:]:
            raise DataError(
                f"{where}: '{h5_path}' has [C, H, W] = {shape[1:]} but earlier sequences of the split "
                f"{self._chw}; a split must hold one representation size: preprocess them alike"
            )
        return EventSequence(
            name=seq_dir.name,
            h5_path=h5_path,
            labels_path=labels_path,
            num_representations=shape[0],
            frame_repr_idx=frame_repr_idx,
            frame_label_start=np.append(starts, len(labels)),
            labels=labels,
            usable=self._usable_boxes(labels, shape[2], shape[3]),
        )

    def _usable_boxes(self, labels: np.ndarray, height: int, width: int) -> np.ndarray:
        """Boxes with a positive, finite size that overlap the sensor (labels are in sensor pixels)."""
        if not len(labels):
            return np.zeros(0, bool)
        x, y, w, h = (labels[k].astype(np.float64) for k in ("x", "y", "w", "h"))
        sensor_w, sensor_h = width / self.label_scale, height / self.label_scale
        finite = np.isfinite(x) & np.isfinite(y) & np.isfinite(w) & np.isfinite(h)
        with np.errstate(invalid="ignore"):
            return finite & (w > 0) & (h > 0) & (x < sensor_w) & (y < sensor_h) & (x + w > 0) & (y + h > 0)

    def _report_unusable_boxes(self, log: logging.Logger) -> None:
        dropped = [(seq.name, int(i)) for seq in self.sequences for i in np.flatnonzero(~seq.usable)]
        if not dropped:
            return
        total = sum(len(seq.labels) for seq in self.sequences)
        log.warning(
            f"{self.where}: {len(dropped)} of {total} boxes dropped (zero or negative size, or outside the "
            f"{self.width / self.label_scale:g}x{self.height / self.label_scale:g} sensor): "
            f"{first_few([f'{name} labels.npz row {row}' for name, row in dropped])}. Fix them in labels_v2/labels.npz "
            "to train on them"
        )

    def _read_every_representation(self) -> None:
        files = [str(seq.h5_path) for seq in self.sequences]
        identity = dict(kind="rvt_events", split=self.where, files=sorted(os.path.abspath(f) for f in files))

        def run():
            for seq in self.sequences:
                _read_all(seq.h5_path, self.where)
            return dict(sequences=len(files)), files

        cached_check(identity, run, files=files)

    # ------------------------------------------------------------------ labels (no h5 access)

    def __len__(self) -> int:
        return len(self._index)

    def stream_order(self) -> List[List[int]]:
        """Per recording, its samples in time order (one list per sequence, in ``sequences`` order)."""
        order: List[List[int]] = [[] for _ in self.sequences]
        for i, (s, _) in enumerate(self._index):
            order[s].append(i)
        return [o for o in order if o]

    def _clip_span(self, seq: EventSequence, k: int, end: int) -> Tuple[int, int]:
        """``(first representation, front padding)`` of the sample ending at labelled frame k."""
        if self.sampling == "streaming":
            return (0 if k == 0 else int(seq.frame_repr_idx[k - 1]) + 1), 0
        start = max(0, end - self.sequence_length + 1)
        return start, self.sequence_length - (end + 1 - start)

    def _boxes(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        x, y = rows["x"].astype(np.float32), rows["y"].astype(np.float32)
        w, h = rows["w"].astype(np.float32), rows["h"].astype(np.float32)
        boxes = np.stack([x, y, x + w, y + h], axis=1).reshape(-1, 4) * np.float32(self.label_scale)
        return boxes.astype(np.float32), rows["class_id"].astype(np.int64)

    def sample_info(self, i: int) -> dict:
        """Which frame sample ``i`` ends at and its boxes; reads no representation."""
        s, k = self._index[i]
        seq = self.sequences[s]
        rows, every = seq.frame_labels(k), seq.frame_rows(k)
        boxes, labels = self._boxes(rows)
        return dict(
            sequence=seq.name,
            sequence_index=s,
            objframe_idx=k,
            repr_idx=int(seq.frame_repr_idx[k]),
            timestamp_us=int(every["t"][0]) if len(every) and "t" in every.dtype.names else -1,
            bboxes=boxes,
            labels=labels,
        )

    # ------------------------------------------------------------------ representations (lazy h5)

    def _dataset(self, s: int):
        if self._owner_pid != os.getpid():  # forked worker: the parent's handles are not ours to use
            self._handles, self._owner_pid = {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = _open_h5(self.sequences[s].h5_path, self.where)
        return self._handles[s][1]

    def close(self) -> None:
        """Close the HDF5 files this process opened."""
        if self._owner_pid == os.getpid():
            for f, _ in self._handles.values():
                f.close()
        self._handles = {}

    def __getstate__(self):  # pickled for spawned workers: send no open files
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} clips")
        info = self.sample_info(i)
        s, end = info["sequence_index"], info["repr_idx"]
        seq = self.sequences[s]
        start, pad = self._clip_span(seq, info["objframe_idx"], end)
        L = pad + end + 1 - start
        dset = self._dataset(s)
        try:
            real = dset[start : end + 1]
        except OSError as e:
            raise UnreadableDataError(
                f"{self.where}: cannot read representations {start}..{end} of '{seq.h5_path}' ({e}); the file "
                "is corrupt: copy it again or re-run RVT's preprocessing"
            ) from e
        clip = np.zeros((L,) + real.shape[1:], dtype=real.dtype)
        clip[pad:] = real
        valid = np.arange(L) >= pad
        is_first = np.zeros(L, bool)
        # a random clip has no history; a streamed segment continues the state of the one before it
        is_first[pad] = self.sampling == "random" or start == 0
        repr_indices = np.full(L, -1, np.int64)
        repr_indices[pad:] = np.arange(start, end + 1)

        # Labelled frames inside the clip: frame_repr_idx is increasing, so one searchsorted.
        frames = np.searchsorted(seq.frame_repr_idx, repr_indices[pad:])
        frames = np.minimum(frames, len(seq.frame_repr_idx) - 1)
        hit = seq.frame_repr_idx[frames] == repr_indices[pad:]
        labelled = np.zeros(L, bool)
        labelled[pad:] = hit
        out = dict(
            info,
            clip=clip,
            valid=valid,
            is_first=is_first,
            labelled=labelled,
            repr_indices=repr_indices,
            starts_sequence=bool(start == 0),
        )
        if self.sampling == "streaming":
            out["stream_end"] = bool(info["objframe_idx"] == len(seq.frame_repr_idx) - 1)
        if self.all_labels:
            empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
            per_step = [empty] * L
            for t in np.flatnonzero(labelled):
                per_step[t] = self._boxes(seq.frame_labels(int(frames[t - pad])))
            out["step_bboxes"] = [b for b, _ in per_step]
            out["step_labels"] = [c for _, c in per_step]
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root='{self.root}', split='{self.split}', sequences={len(self.sequences)}, "
            f"clips={len(self)}, L={self.sequence_length if self.sampling == 'random' else 'segments'}, "
            f"file={self.h5_name}, "
            f"CxHxW={self.channels}x{self.height}x{self.width}, classes={len(self.class_names)})"
        )


def stream_schedule(order: Sequence[Sequence[int]], streams: int) -> List[int]:
    """Sample order for streaming ``order`` (per recording, its samples in time order) in ``streams``
    parallel streams, as consecutive batches of ``streams`` samples.

    Recordings go to streams longest first, each to the stream with the fewest samples so far, and the
    streams are interleaved: position ``t * streams + j`` holds stream j's t-th sample while every
    stream has one. Each recording's samples keep their order, so a model that carries one state per
    recording sees each recording from its start; once the shorter streams run out, a batch can hold
    two samples of one recording, in order.
    """
    if int(streams) < 1:
        raise ValueError(f"streams must be a positive integer, got {streams}")
    lanes: List[List[int]] = [[] for _ in range(int(streams))]
    for recording in sorted(order, key=len, reverse=True):
        min(lanes, key=len).extend(recording)
    schedule = []
    for t in range(max(len(lane) for lane in lanes)):
        schedule.extend(lane[t] for lane in lanes if t < len(lane))
    return schedule


# RVT's evaluation (Prophesee's protocol, RVT utils/evaluation/prophesee): before COCO AP, ground truth
# and detections lose the first 0.5 s of each recording and every box with a diagonal under
# min_box_diag or a side under min_box_side, in sensor pixels (both halved on data downsampled by 2).
RVT_SKIP_FIRST_US = 500_000
RVT_BOX_FILTERS = {"gen1": (30, 10), "gen4": (60, 20)}  # (min_box_diag, min_box_side)
RVT_CAMERAS = {"gen1": "gen1", "gen4": "gen4", "1mpx": "gen4", "etram": "gen4"}  # eTraM: a 1280x720 sensor


def rvt_box_thresholds(camera: str, downsampled_by_2: bool) -> Tuple[float, float]:
    """``(min_box_diag, min_box_side)`` RVT evaluates ``camera`` with (gen1, gen4 / 1mpx, etram)."""
    if camera not in RVT_CAMERAS:
        raise ValueError(f"camera must be one of {sorted(RVT_CAMERAS)}, got {camera!r}")
    diag, side = RVT_BOX_FILTERS[RVT_CAMERAS[camera]]
    return (diag / 2, side / 2) if downsampled_by_2 else (float(diag), float(side))


def rvt_box_filter(
    boxes_xyxy, timestamp_us: int, min_box_diag: float, min_box_side: float, skip_first_us: int = RVT_SKIP_FIRST_US
) -> np.ndarray:
    """Bool mask of the boxes RVT's evaluation keeps (``filter_boxes``: after ``skip_first_us``, diagonal
    and both sides at least the thresholds)."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = (w**2 + h**2 >= min_box_diag**2) & (w >= min_box_side) & (h >= min_box_side)
    return keep & (int(timestamp_us) > skip_first_us)


class MixedSchedule:
    """RVT's mixed training sampling as an index order: each batch holds ``random_per_batch``
    random-access clips and one streamed segment of each of ``streams`` lanes.

    A lane streams one recording's segments in order, then the next recording (recordings in a
    shuffled cycle shared by the lanes), and continues across epochs, so a model that carries one
    state per recording sees each recording from its start (RVT's streaming training, whose state
    bookkeeping per data loader worker becomes here one state per recording). An epoch is
    ``ceil(num_random / random_per_batch)`` batches (every random clip once), or with no random
    clips ``ceil(segments / streams)``. Indices: ``0 .. num_random - 1`` for the random clips,
    ``num_random + j`` for streamed sample j. Deterministic given ``seed`` and the epochs asked for.

    Args:
        num_random: random-access samples.
        stream_order: per recording, its streamed samples in time order.
        random_per_batch, streams: the batch's composition (RVT: 1:1); the loader's batch size must
            be their sum.
        seed: the shuffling seed.
        rank, world_size: this process's share: every ``world_size``-th random clip of an epoch's
            permutation and recording of the cycle, from ``rank``.
    """

    def __init__(
        self,
        num_random: int,
        stream_order: Sequence[Sequence[int]],
        random_per_batch: int = 1,
        streams: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if random_per_batch < 0 or streams < 0 or random_per_batch + streams == 0:
            raise ValueError(
                f"random_per_batch ({random_per_batch}) and streams ({streams}) must be >= 0 and not both 0"
            )
        if random_per_batch and not num_random:
            raise ValueError("random_per_batch > 0 needs random-access samples; the random dataset is empty")
        recordings = [list(r) for r in stream_order if len(r)][rank::world_size]
        if streams and not recordings:
            raise ValueError(f"streams > 0 needs recordings to stream; process {rank} of {world_size} has none")
        self.num_random, self.recordings = int(num_random), recordings
        self.random_per_batch, self.streams = int(random_per_batch), int(streams)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self._lanes: List[List[int]] = [[] for _ in range(self.streams)]
        self._cycle: List[int] = []
        self._cycle_rng = np.random.default_rng([self.seed, self.rank, 1])
        self._epochs_done = 0

    def batches_per_epoch(self) -> int:
        if self.random_per_batch:
            share = len(range(self.rank, self.num_random, self.world_size))
            return max(1, -(-share // self.random_per_batch))
        return max(1, -(-sum(len(r) for r in self.recordings) // self.streams))

    def _next_segment(self, lane: List[int]) -> int:
        if not lane:
            if not self._cycle:
                self._cycle = list(self._cycle_rng.permutation(len(self.recordings)))
            lane.extend(self.recordings[self._cycle.pop(0)])
        return self.num_random + lane.pop(0)

    def next_epoch(self) -> List[int]:
        """The indices of the next epoch (the lanes go on from where the last epoch left them)."""
        epoch = self._epochs_done
        self._epochs_done += 1
        randoms: List[int] = []
        if self.random_per_batch:
            perm = np.random.default_rng([self.seed, epoch, 0]).permutation(self.num_random)
            randoms = [int(i) for i in perm[self.rank :: self.world_size]]
        order: List[int] = []
        for b in range(self.batches_per_epoch()):
            for j in range(self.random_per_batch):
                order.append(randoms[(b * self.random_per_batch + j) % len(randoms)])
            order.extend(self._next_segment(lane) for lane in self._lanes)
        return order
