"""The data check every dataset of the project goes through when it is first used (framework-free).

What is checked (``docs/formats.md`` has the layouts):

- every referenced file exists and decodes: by default a cheap header check (PIL reads the header
  and size; a JPEG must end with its end-of-image marker and a PNG with its IEND chunk, or else
  decode completely), ``mode="full"`` (or ``RAT_DATA_CHECK=full``) decodes every image and mask;
- an image has the size its annotation gives, a mask the size of its image, one channel and (full
  mode) only the values the dataset knows;
- COCO-style annotation files: valid JSON with the COCO keys, no annotation on an unknown image or
  category id, boxes of zero / negative size or outside the image counted and reported at WARNING
  with the first few annotation ids; splits are not empty.

Problems are :class:`DataError` (a :class:`~rat_plugins.utils.config_keys.ConfigError`): the tools
print ``error: <message>`` and stop. Each message names the split, the file and the fix. A check
that passed is remembered in a small JSON file per dataset under
``${XDG_CACHE_HOME:-~/.cache}/rat-plugins/data_checks/`` (``RAT_DATA_CHECK_CACHE`` moves it, ``off``
turns it off), keyed by the file list, sizes, modification times and the check's options: an
unchanged dataset is not read again; any changed file makes it checked anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..utils.atomic import atomic_write_json
from ..utils.config_keys import ConfigError

__all__ = [
    "CACHE_VARIABLE",
    "CHECK_MODES",
    "CHECK_MODE_VARIABLE",
    "DataError",
    "ImageEntry",
    "ImageInfo",
    "MissingDataError",
    "UnreadableDataError",
    "box_status",
    "cache_dir",
    "cached_check",
    "check_coco_detection",
    "check_image",
    "check_image_files",
    "check_mode",
    "coco_index",
    "ensure_readable",
    "first_few",
    "image_problem",
    "load_coco_json",
    "report_dropped_boxes",
]

logger = logging.getLogger(__name__)

CHECK_MODES = ("header", "full")
CHECK_MODE_VARIABLE = "RAT_DATA_CHECK"
CACHE_VARIABLE = "RAT_DATA_CHECK_CACHE"
FIRST_FEW = 5
_CACHE_VERSION = 1
_CACHE_MAX_ENTRIES = 512
_TAIL_BYTES = 1024  # where a JPEG's end marker / a PNG's IEND chunk must be
_PARALLEL_FROM = 64  # file lists at least this long are checked by a thread pool (the work is I/O)
COCO_KEYS = ("images", "annotations", "categories")


# ----------------------------------------------------------------------------- errors


class DataError(ConfigError):
    """A dataset that cannot be used as it is; the message names the split, the file and the fix."""

    def __init__(self, message: str = ""):
        super().__init__(_unwrap_worker_message(self, str(message)))


class MissingDataError(DataError, FileNotFoundError):
    """A file or folder the dataset needs does not exist (also a ``FileNotFoundError``)."""


class UnreadableDataError(DataError, OSError):
    """A file exists but cannot be read or decoded: empty, truncated, not an image (also an ``OSError``)."""


def _unwrap_worker_message(error: BaseException, message: str) -> str:
    """A DataLoader worker re-raises our error as ``type(e)("Caught ... Original Traceback ...")``;
    keep only the original message (and where it happened), so that the tools print one line."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    cls = type(error)
    for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
        at = message.rfind(prefix)
        if at >= 0:
            where = message[len("Caught ") : message.find("\n")].rstrip(".")
            where = where[len(cls.__qualname__) :].strip() if where.startswith(cls.__qualname__) else where
            return f"{message[at + len(prefix) :].strip()} ({where})"
    return message


def first_few(items: Sequence, n: int = FIRST_FEW) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 7 more``."""
    items = [str(i) for i in items]
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def check_mode(mode: Optional[str] = None) -> str:
    """``mode``, else ``$RAT_DATA_CHECK``, else ``header``; anything else is a ConfigError."""
    chosen = mode or os.environ.get(CHECK_MODE_VARIABLE) or "header"
    if chosen not in CHECK_MODES:
        source = f"${CHECK_MODE_VARIABLE}" if not mode else "the data check mode"
        raise ConfigError(f"{source} is {chosen!r}; choose one of {', '.join(CHECK_MODES)}")
    return chosen


# ----------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: size as the frameworks see it (EXIF orientation applied), bands, format."""

    width: int
    height: int
    bands: int
    format: str


class _FileProblem(Exception):
    def __init__(self, reason: str, missing: bool = False):
        super().__init__(reason)
        self.reason, self.missing = reason, missing


def _tail(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(max(0, size - _TAIL_BYTES))
        return f.read()


def _ends_complete(fmt: str, tail: bytes) -> bool:
    """A JPEG's end-of-image marker / a PNG's IEND chunk near the end (trailing padding is allowed)."""
    if fmt == "JPEG":
        return b"\xff\xd9" in tail
    if fmt == "PNG":
        return b"IEND" in tail
    return True  # other formats have no cheap end marker: the header check is all


_TRUNCATED_FLAG = threading.Lock()


def _decode(img) -> None:
    from PIL import ImageFile

    try:
        if not ImageFile.LOAD_TRUNCATED_IMAGES:
            img.load()
        else:  # some libraries switch this on globally; a truncated file must fail here, not decode grey
            with _TRUNCATED_FLAG:
                ImageFile.LOAD_TRUNCATED_IMAGES = False
                try:
                    img.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = True
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _FileProblem(f"cannot be decoded, it is truncated or corrupt ({e})") from e


def _inspect_image(path: str, mode: str = "header") -> ImageInfo:
    """Open ``path`` and return its :class:`ImageInfo`; raises ``_FileProblem`` with the reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.stat(path).st_size
    except FileNotFoundError as e:
        raise _FileProblem("does not exist", missing=True) from e
    except OSError as e:
        raise _FileProblem(f"cannot be read ({e.strerror or e})") from e
    if size == 0:
        raise _FileProblem("is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            fmt = img.format or "?"
            width, height = img.size
            bands = len(img.getbands())
            if fmt == "JPEG" and img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width  # detectron2 and mmcv apply the EXIF rotation
            if mode == "full" or not _ends_complete(fmt, _tail(path, size)):
                _decode(img)  # no end marker: decide by decoding (trailing bytes are allowed)
    except _FileProblem:
        raise
    except UnidentifiedImageError as e:
        raise _FileProblem("is not an image file (its content is no image format PIL can read)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _FileProblem(f"cannot be read as an image ({type(e).__name__}: {e})") from e
    return ImageInfo(int(width), int(height), bands, fmt)


def image_problem(path: str, mode: str = "full") -> Optional[str]:
    """Why ``path`` cannot be used as an image (``"does not exist"``, ...), or None."""
    try:
        _inspect_image(path, mode)
    except _FileProblem as e:
        return e.reason
    return None


def _file_error(split: str, what: str, path: str, reason: str, listed_in: Optional[str], missing: bool) -> DataError:
    source = f" (listed in {listed_in})" if listed_in else ""
    if missing:
        fix = f"restore it (copy the dataset again){f', or remove it from {listed_in}' if listed_in else ''}"
        return MissingDataError(f"{split}: {what} file '{path}'{source} does not exist; {fix}")
    return UnreadableDataError(
        f"{split}: {what} file '{path}'{source} {reason}; copy or download it again (or remove it from the dataset)"
    )


def check_image(
    path: str, split: str, mode: Optional[str] = None, what: str = "image", listed_in: Optional[str] = None
) -> ImageInfo:
    """The image's :class:`ImageInfo`, or a :class:`DataError` naming the split and the file, with the fix."""
    try:
        return _inspect_image(str(path), check_mode(mode))
    except _FileProblem as e:
        raise _file_error(split, what, str(path), e.reason, listed_in, e.missing) from None


def ensure_readable(path: str, split: str, what: str = "image") -> None:
    """The per-sample guard of the loaders: the file is there and ends as it should (a few bytes
    read; a file without its end marker is decoded to decide). Raises a :class:`DataError`."""
    check_image(path, split, mode="header", what=what)


# ----------------------------------------------------------------------------- many images


@dataclass(frozen=True)
class ImageEntry:
    """One image to check: its path, the (width, height) its annotation gives, its mask."""

    path: str
    size: Optional[Tuple[int, int]] = None
    mask: Optional[str] = None


@dataclass(frozen=True)
class _Problem:
    kind: str  # missing / unreadable / size / mask
    what: str  # image / mask
    path: str
    reason: str


def _check_entry(entry: ImageEntry, mode: str, mask_values: Optional[frozenset]) -> List[_Problem]:
    problems = []
    try:
        info = _inspect_image(entry.path, mode)
    except _FileProblem as e:
        return [_Problem("missing" if e.missing else "unreadable", "image", entry.path, e.reason)]
    if entry.size is not None and (info.width, info.height) != tuple(entry.size):
        w, h = entry.size
        reason = f"is {info.width}x{info.height} but the annotations say {w}x{h}"
        problems.append(_Problem("size", "image", entry.path, reason))
    if entry.mask is None:
        return problems
    try:
        mask = _inspect_image(entry.mask, mode)
    except _FileProblem as e:
        return problems + [_Problem("missing" if e.missing else "unreadable", "mask", entry.mask, e.reason)]
    if (mask.width, mask.height) != (info.width, info.height):
        reason = (
            f"is {mask.width}x{mask.height} but its image '{entry.path}' is {info.width}x{info.height} "
            "(it would be stretched onto the image)"
        )
        problems.append(_Problem("mask", "mask", entry.mask, reason))
    elif mask.bands != 1:
        reason = f"has {mask.bands} channels, a mask has one (the class of each pixel)"
        problems.append(_Problem("mask", "mask", entry.mask, reason))
    elif mode == "full" and mask_values is not None:
        unknown = _unknown_values(entry.mask, mask_values)
        if unknown:
            reason = f"holds the values {unknown}, which are no class (a mask holds {sorted(mask_values)})"
            problems.append(_Problem("mask", "mask", entry.mask, reason))
    return problems


def _unknown_values(path: str, allowed: frozenset) -> List[int]:
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        values = np.unique(np.asarray(img))
    return [int(v) for v in values if int(v) not in allowed][:8]


_KINDS = ("missing", "unreadable", "size", "mask")  # reported in this order: the first kind found
_FIXES = {
    "missing": "restore them (copy the dataset again){listed}",
    "unreadable": "copy or download them again (or remove them from the dataset)",
    "size": "re-export the annotations with the images' sizes or restore the original images (else boxes land "
    "in the wrong place)",
    "mask": "regenerate the masks from their images (a mask has its image's size and one channel of class values)",
}
_SUMMARY = {  # kind -> (one, several)
    "missing": ("does not exist", "do not exist"),
    "unreadable": ("cannot be read", "cannot be read"),
    "size": ("does not have the annotated size", "do not have the annotated size"),
    "mask": ("is not a usable mask", "are not usable masks"),
}


def _raise_problems(problems: List[_Problem], split: str, listed_in: Optional[str], total: int) -> None:
    kind = next(k for k in _KINDS if any(p.kind == k for p in problems))
    found = [p for p in problems if p.kind == kind]
    if len(problems) == 1:
        p = problems[0]
        if kind in ("missing", "unreadable"):
            raise _file_error(split, p.what, p.path, p.reason, listed_in, kind == "missing")
        source = f" (listed in {listed_in})" if listed_in and p.what == "image" else ""
        raise DataError(f"{split}: {p.what} file '{p.path}'{source} {p.reason}; {_FIXES[kind].format(listed='')}")
    cls = {"missing": MissingDataError, "unreadable": UnreadableDataError}.get(kind, DataError)
    what = ("mask" if all(p.what == "mask" for p in found) else "file") + ("s" if len(found) > 1 else "")
    details = first_few([f"'{p.path}'" if kind == "missing" else f"'{p.path}' {p.reason}" for p in found])
    others = len(problems) - len(found)
    source = f" (of {total} listed in {listed_in})" if listed_in else f" (of {total} images)"
    listed = f", or remove them from {listed_in}" if listed_in else ""
    also = f"; {others} problem(s) of another kind remain after these" if others else ""
    summary = _SUMMARY[kind][len(found) > 1]
    raise cls(f"{split}: {len(found)} {what}{source} {summary}: {details}; {_FIXES[kind].format(listed=listed)}{also}")


def check_image_files(
    entries: Sequence[ImageEntry],
    split: str,
    *,
    listed_in: Optional[str] = None,
    mode: Optional[str] = None,
    mask_values: Optional[Iterable[int]] = None,
    cache: bool = True,
) -> dict:
    """Check every image (and mask) of a split; raise one :class:`DataError` listing the first few problems.

    Args:
        entries: the split's images.
        split: how messages name the split (``head_detection_test``, ``ISIC Training``).
        listed_in: the annotation file that lists the images, named in messages.
        mode: ``header`` / ``full`` (default ``$RAT_DATA_CHECK``, else ``header``).
        mask_values: the raw values a mask may hold; checked in full mode.
        cache: remember a passed check (see the module docstring).
    Returns:
        ``dict(images=, masks=, mode=, cached=)``.
    """
    mode = check_mode(mode)
    if not entries:
        source = f" listed in {listed_in}" if listed_in else ""
        raise DataError(
            f"{split}: the split is empty, no images{source}; put the split's images there or drop the split"
        )
    allowed = frozenset(int(v) for v in mask_values) if mask_values is not None else None
    paths = [e.path for e in entries] + [e.mask for e in entries if e.mask]

    def run():
        if len(entries) >= _PARALLEL_FROM:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                found = list(pool.map(lambda e: _check_entry(e, mode, allowed), entries))
        else:
            found = [_check_entry(e, mode, allowed) for e in entries]
        problems = [p for per_entry in found for p in per_entry]
        if problems:
            _raise_problems(problems, split, listed_in, len(entries))
        return dict(images=len(entries), masks=sum(1 for e in entries if e.mask), mode=mode), paths

    if not cache:
        return dict(run()[0], cached=False)
    identity = dict(
        kind="image_files",
        split=split,
        listed_in=os.path.abspath(listed_in) if listed_in else None,
        first=os.path.abspath(entries[0].path),
        mode=mode,
        mask_values=sorted(allowed) if allowed is not None else None,
    )
    extra = [[e.path, list(e.size) if e.size else None, e.mask] for e in entries]
    result, cached = cached_check(identity, run, files=paths, extra=extra)
    return dict(result, cached=cached)


# ----------------------------------------------------------------------------- the cache


def cache_dir() -> Optional[str]:
    """Where passed checks are remembered; None when ``RAT_DATA_CHECK_CACHE`` is ``off`` (or empty)."""
    value = os.environ.get(CACHE_VARIABLE)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(os.path.expanduser(base), "rat-plugins", "data_checks")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _signature(files: Sequence[str], extra=None) -> str:
    """Digest of every file's (path, size, modification time) and the check's inputs."""
    stats = []
    for path in files:
        try:
            st = os.stat(path)
            stats.append([path, st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append([path, None, None])
    return _digest([stats, extra])


def _entry_path(identity: dict) -> Optional[str]:
    folder = cache_dir()
    return os.path.join(folder, f"{identity.get('kind', 'check')}-{_digest(identity)[:24]}.json") if folder else None


def cached_check(
    identity: dict, compute: Callable[[], Tuple[dict, List[str]]], files: Optional[Sequence[str]] = None, extra=None
) -> Tuple[dict, bool]:
    """Run ``compute`` unless a passed check of ``identity`` with unchanged files is remembered.

    Args:
        identity: what is checked and how (paths, split, options); one cache file per identity.
        compute: runs the check (raising on a problem) and returns ``(result, files it read)``.
        files: the files the result depends on, when known without reading anything (else the
            ones ``compute`` returned last time are compared).
        extra: further inputs the result depends on (e.g. the annotated sizes).
    Returns:
        ``(result, True)`` from the cache, else ``(compute()'s result, False)``.
    """
    path = _entry_path(identity)
    if path is not None:
        stored = _read_entry(path, identity)
        if stored is not None:
            listed = list(files) if files is not None else stored.get("files")
            if listed is not None and _signature(listed, extra) == stored.get("signature"):
                return stored["result"], True
    result, read = compute()
    if path is not None:
        depends = list(files) if files is not None else list(read)
        entry = dict(
            version=_CACHE_VERSION,
            identity=identity,
            signature=_signature(depends, extra),
            files=None if files is not None else depends,
            result=result,
            checked_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        _write_entry(path, entry)
    return result, False


def _read_entry(path: str, identity: dict) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None  # absent or damaged: check again (and rewrite it)
    if not isinstance(entry, dict) or entry.get("version") != _CACHE_VERSION or entry.get("identity") != identity:
        return None
    return entry


def _write_entry(path: str, entry: dict) -> None:
    try:
        atomic_write_json(path, entry, indent=None)
        _prune(os.path.dirname(path))
    except OSError as e:  # the cache only saves time: a failed write is reported, never fatal
        logger.warning("data check passed but its result could not be cached (%s); the next run checks again", e)


def _prune(folder: str) -> None:
    with os.scandir(folder) as it:
        entries = [e for e in it if e.name.endswith(".json") and e.is_file()]
    if len(entries) <= _CACHE_MAX_ENTRIES:
        return
    entries.sort(key=lambda e: e.stat().st_mtime)
    for e in entries[: len(entries) - _CACHE_MAX_ENTRIES]:
        with contextlib.suppress(OSError):
            os.unlink(e.path)


# ----------------------------------------------------------------------------- COCO annotations


def load_coco_json(path, split: str, fix_missing: str = "") -> dict:
    """Read a COCO annotation file and check its structure; every problem is a :class:`DataError`.

    Checks: the file exists and is JSON with ``images`` / ``annotations`` / ``categories`` lists,
    images have ``id`` / ``file_name`` / ``width`` / ``height``, annotations ``id`` / ``image_id`` /
    ``category_id`` / ``bbox`` (4 numbers), categories ``id`` / ``name``.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise MissingDataError(
            f"{split}: annotation file '{path}' does not exist" + (f"; {fix_missing}" if fix_missing else "")
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            f"{split}: '{path}' is not valid JSON ({e}); the file is damaged: export or download it again"
        ) from e
    if not isinstance(data, dict):
        raise DataError(
            f"{split}: '{path}' is not a COCO annotation file (a JSON {type(data).__name__}, not an object)"
        )
    missing = [k for k in COCO_KEYS if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(
            f"{split}: '{path}' is not a COCO annotation file: missing keys {missing} "
            f"(it needs the lists {list(COCO_KEYS)}); export it again in COCO format"
        )
    _require_keys(data["images"], ("id", "file_name", "width", "height"), "image", path, split)
    _require_keys(data["annotations"], ("id", "image_id", "category_id", "bbox"), "annotation", path, split)
    _require_keys(data["categories"], ("id", "name"), "category", path, split)
    bad_boxes = [
        a["id"]
        for a in data["annotations"]
        if not (isinstance(a["bbox"], (list, tuple)) and len(a["bbox"]) == 4 and all(_is_number(v) for v in a["bbox"]))
    ]
    if bad_boxes:
        raise DataError(
            f"{split}: '{path}': annotations {first_few(bad_boxes)} have a bbox that is not 4 numbers "
            "[x, y, width, height]; fix or re-export them"
        )
    return data


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require_keys(items, keys, what: str, path: str, split: str) -> None:
    for i, item in enumerate(items):
        lacking = [k for k in keys if not isinstance(item, dict) or k not in item]
        if lacking:
            name = item.get("id", f"#{i}") if isinstance(item, dict) else f"#{i}"
            raise DataError(
                f"{split}: '{path}': {what} {name} lacks {lacking} (a COCO {what} has {list(keys)}); "
                "fix or re-export the file"
            )


def coco_index(data: dict, path: str, split: str) -> Dict[int, dict]:
    """``{image id: image}``; duplicate image ids, annotations on unknown images or of unknown
    categories are :class:`DataError`."""
    images: Dict[int, dict] = {}
    for img in data["images"]:
        if img["id"] in images:
            raise DataError(f"{split}: '{path}' lists image id {img['id']} twice; re-export the annotations")
        images[img["id"]] = img
    unknown_images = [a for a in data["annotations"] if a["image_id"] not in images]
    if unknown_images:
        ids = sorted({a["image_id"] for a in unknown_images})
        raise DataError(
            f"{split}: '{path}': {_annotations(unknown_images)} {'refers' if len(unknown_images) == 1 else 'refer'} "
            f"to unknown image {'id' if len(ids) == 1 else 'ids'} {first_few(ids)} (not in its 'images'); "
            "re-export the annotations, or remove those annotations"
        )
    category_ids = {c["id"] for c in data["categories"]}
    unknown = [a for a in data["annotations"] if a["category_id"] not in category_ids]
    if unknown:
        ids = sorted({a["category_id"] for a in unknown})
        raise DataError(
            f"{split}: '{path}': {_annotations(unknown)} {'uses' if len(unknown) == 1 else 'use'} unknown category "
            f"{'id' if len(ids) == 1 else 'ids'} {first_few(ids)} (its 'categories' have the ids "
            f"{sorted(category_ids)}); add the categories or fix the annotations"
        )
    return images


def _annotations(annotations: List[dict]) -> str:
    ids = [a["id"] for a in annotations]
    return f"annotation {ids[0]}" if len(ids) == 1 else f"{len(ids)} annotations (ids {first_few(ids)})"


def box_status(bbox: Sequence[float], width: float, height: float) -> str:
    """``ok``, ``clipped`` (partly outside the image), ``degenerate`` (zero / negative size, not
    finite) or ``outside`` (nothing inside the image) for a COCO ``[x, y, w, h]`` box."""
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return "degenerate"
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        return "outside"
    return "clipped" if (x0, y0, x1, y1) != (x, y, x + w, y + h) else "ok"


def report_dropped_boxes(
    split: str, path: str, ids: Dict[str, List], total: int, counts: Optional[Dict[str, int]] = None, log=None
) -> Optional[str]:
    """Log (WARNING) how many boxes of a split are not used, with the first few annotation ids.

    Args:
        ids: ``{"degenerate": [ids], "outside": [ids]}`` (all, or the first few when ``counts`` is given).
        total: boxes in the file.
        counts: ``{kind: number}`` when ``ids`` holds only the first few.
    Returns:
        the message, or None when no box was dropped.
    """
    counts = counts or {k: len(v) for k, v in ids.items()}
    n = sum(counts.values())
    if not n:
        return None
    words = {"degenerate": "of zero or negative size", "outside": "entirely outside the image"}
    parts = [
        f"{counts[k]} {words[k]} (annotation ids {_ids(ids.get(k, []), counts[k])})" for k in words if counts.get(k)
    ]
    message = (
        f"{split}: {n} of {total} boxes in {path} {'is' if n == 1 else 'are'} dropped: {'; '.join(parts)}. "
        "Fix them in the annotation file to train on them"
    )
    (log or logger).warning(message)
    return message


def _ids(ids: List, count: int) -> str:
    shown = list(ids)[:FIRST_FEW]
    more = f" and {count - len(shown)} more" if count > len(shown) else ""
    return ", ".join(map(str, shown)) + more


def check_coco_detection(
    ann_file, image_root, split: str, *, mode: Optional[str] = None, fix_missing: str = "", log=None
) -> dict:
    """Check a COCO detection split: annotation file, every image, boxes (see the module docstring).

    Boxes of zero / negative size or outside the image are counted and reported at WARNING with
    their first few ids (detectron2's loader ignores them). Cached like :func:`check_image_files`:
    an unchanged split reads neither the annotation file nor the images again.

    Returns:
        ``dict(images=, boxes=, classes=[names in id order], category_ids=, dropped={kind: [ids]},
        empty_images=, cached=)``.
    """
    mode = check_mode(mode)
    ann_file, image_root = os.path.abspath(ann_file), os.path.abspath(image_root)
    identity = dict(kind="coco", ann_file=ann_file, image_root=image_root, split=split, mode=mode)

    def run():
        data = load_coco_json(ann_file, split, fix_missing)
        images = coco_index(data, ann_file, split)
        if not images:
            raise DataError(f"{split}: '{ann_file}' lists no images; the split is empty: export it again or drop it")
        dropped: Dict[str, List] = {"degenerate": [], "outside": []}
        for ann in data["annotations"]:
            img = images[ann["image_id"]]
            status = box_status(ann["bbox"], img["width"], img["height"])
            if status in dropped and not ann.get("iscrowd", 0):
                dropped[status].append(ann["id"])
        entries = [
            ImageEntry(os.path.join(image_root, img["file_name"]), (int(img["width"]), int(img["height"])))
            for img in images.values()
        ]
        checked = check_image_files(entries, split, listed_in=ann_file, mode=mode, cache=False)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        result = dict(
            images=len(images),
            boxes=len(data["annotations"]) - sum(len(v) for v in dropped.values()),
            classes=[c["name"] for c in categories],
            category_ids=[c["id"] for c in categories],
            dropped={k: v[:FIRST_FEW] for k, v in dropped.items()},
            dropped_counts={k: len(v) for k, v in dropped.items()},
            empty_images=len(images) - len({a["image_id"] for a in data["annotations"]}),
            mode=checked["mode"],
        )
        return result, [ann_file] + [e.path for e in entries]

    result, cached = cached_check(identity, run)
    total = result["boxes"] + sum(result["dropped_counts"].values())
    report_dropped_boxes(split, ann_file, result["dropped"], total, counts=result["dropped_counts"], log=log)
    return dict(result, cached=cached)


def model_num_classes(node, prefix: str = "model") -> list:
    """(dotted key, value) of every integer ``num_classes`` in a model config (dicts and lists,
    detectron2's OmegaConf nodes included). RPNs are class-agnostic: skipped."""
    found = []
    if hasattr(node, "keys"):
        keys = list(node.keys())
    elif isinstance(node, (list, tuple)) or type(node).__name__ == "ListConfig":
        keys = list(range(len(node)))
    else:
        return found
    for key in keys:
        path = f"{prefix}.{key}"
        if "proposal_generator" in path or "rpn" in str(key):
            continue
        try:
            value = node[key]
        except Exception:  # noqa: BLE001  (an interpolation that only resolves elsewhere)
            continue
        if key == "num_classes":
            if isinstance(value, int) and not isinstance(value, bool):
                found.append((path, value))
        else:
            found += model_num_classes(value, path)
    return found
