"""Roboflow COCO exports: a clean copy without the supercategory entry and invalid boxes, and the
check of a split (annotations, classes, every image) that the loaders run before using it.

Roboflow lists the supercategory as a category of its own next to the real class (see
docs/formats.md, Roboflow COCO export), which would make a 1-class detector train with 2 classes.
"""

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..utils.atomic import atomic_write_json
from .validate import (
    DataError,
    ImageEntry,
    box_status,
    check_image_files,
    coco_index,
    first_few,
    load_coco_json,
    report_dropped_boxes,
)

__all__ = ["check_roboflow_split", "count_images", "filter_roboflow_coco", "FILTERED_NAME", "ORIGINAL_NAME"]

logger = logging.getLogger(__name__)
ORIGINAL_NAME = "_annotations.coco.json"
FILTERED_NAME = "_annotations.coco_filtered.json"


def _missing_fix(path: Path) -> str:
    return (
        f"place the Roboflow export so that {path.parent}/ holds {ORIGINAL_NAME} and the images (see "
        "datasets/README.md), or make the sample: "
        f"python -m rat_plugins.data.synthetic heads --out {path.parent.parent}"
    )


def _load_coco(path: Path, split: str) -> dict:
    return load_coco_json(path, split, fix_missing=_missing_fix(path))


def _split_name(src: Path, split: Optional[str]) -> str:
    return split or f"{src.parent.name} split"


def _real_categories(categories, annotations):
    """Categories that are classes: drop entries that only name another category's supercategory."""
    used = {a["category_id"] for a in annotations}
    super_names = {c.get("supercategory") for c in categories}
    real = [c for c in categories if not (c["name"] in super_names and c["id"] not in used)]
    return sorted(real, key=lambda c: c["id"])


def _chosen_categories(real: List[dict], classes: Optional[Sequence[str]], src: Path, split: str) -> List[dict]:
    """The categories to keep, in the order of ``classes`` (class i of the model is ``classes[i]``)."""
    if classes is None:
        return real
    if isinstance(classes, str):
        classes = [classes]
    by_name = {c["name"]: c for c in real}
    unknown = [name for name in classes if name not in by_name]
    if unknown or not classes:
        raise DataError(
            f"{split}: classes={list(classes)} names {unknown or 'no class'}, but the classes of {src} are "
            f"{sorted(by_name)}; choose classes from those"
        )
    return [by_name[name] for name in classes]


def count_images(path) -> int:
    """Images listed in a COCO annotation file (the filtered copy keeps them all); writes nothing."""
    path = Path(path)
    return len(_load_coco(path, _split_name(path, None))["images"])


def _filter(src: Path, dst: Path, classes, split: str, log) -> Tuple[dict, List[dict]]:
    if dst.resolve() == src.resolve():
        raise DataError(f"refusing to overwrite the original annotations {src}; give another output path")
    data = _load_coco(src, split)
    images = coco_index(data, str(src), split)
    real = _real_categories(data["categories"], data["annotations"])
    if not real:
        raise DataError(f"{split}: {src} has no category with annotations; export the split again")
    categories = _chosen_categories(real, classes, src, split)
    new_id = {c["id"]: i + 1 for i, c in enumerate(categories)}
    names = {c["id"]: c["name"] for c in data["categories"]}

    kept, clipped = [], 0
    dropped: Dict[str, List] = {"degenerate": [], "outside": []}
    left_out: Dict[str, List] = {}
    for ann in data["annotations"]:
        if ann["category_id"] not in new_id:
            left_out.setdefault(names[ann["category_id"]], []).append(ann["id"])
            continue
        img = images[ann["image_id"]]
        status = box_status(ann["bbox"], img["width"], img["height"])
        if status in dropped:
            dropped[status].append(ann["id"])
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(img["width"])), min(y + h, float(img["height"]))
        clipped += status == "clipped"
        kept.append(
            dict(
                ann,
                bbox=[x0, y0, x1 - x0, y1 - y0],
                area=(x1 - x0) * (y1 - y0),
                category_id=new_id[ann["category_id"]],
                segmentation=ann.get("segmentation", []),
            )
        )

    with_boxes = {a["image_id"] for a in kept}
    out = dict(
        data, annotations=kept, categories=[dict(c, id=new_id[c["id"]], supercategory="none") for c in categories]
    )
    atomic_write_json(dst, out, indent=None)
    stats = dict(
        path=str(dst),
        images=len(images),
        boxes=len(kept),
        dropped_degenerate=len(dropped["degenerate"]),
        dropped_outside=len(dropped["outside"]),
        clipped=clipped,
        images_without_boxes=len(images) - len(with_boxes),
        categories=[c["name"] for c in categories],
        left_out={name: len(ids) for name, ids in left_out.items()},
    )
    log = log or logger
    log.info(
        "%s: %d images, %d boxes kept, %d dropped (zero/negative size), %d dropped (outside "
        "the image), %d clipped to the image, %d images without boxes, classes %s",
        src,
        stats["images"],
        stats["boxes"],
        stats["dropped_degenerate"],
        stats["dropped_outside"],
        clipped,
        stats["images_without_boxes"],
        stats["categories"],
    )
    report_dropped_boxes(split, str(src), dropped, len(data["annotations"]), log=log)
    if left_out:
        ids = [i for per_class in left_out.values() for i in per_class]
        log.warning(
            f"{split}: {len(ids)} box(es) of the classes {sorted(left_out)} in {src} are left out by "
            f"classes={list(stats['categories'])} (annotation ids {first_few(ids)}); "
            "the model sees them as background. Add them to classes (and num_classes) to train them"
        )
    return stats, list(images.values())


def filter_roboflow_coco(src, dst=None, classes: Optional[Sequence[str]] = None, split=None, log=None) -> dict:
    """Write the filtered copy of a Roboflow COCO file; return counts of what was changed.

    The copy (``_annotations.coco_filtered.json`` beside the original, which is never edited) has
    only the real classes (or those named by ``classes``), ids remapped to 1..K, boxes clipped to
    the image, boxes of zero / negative size or outside the image dropped; dropped and left-out
    boxes are logged at WARNING with their first few annotation ids.

    Args:
        src: path of ``_annotations.coco.json``.
        dst: output path (default: ``_annotations.coco_filtered.json`` beside ``src``).
        classes: names of the classes to keep, in the model's order (default: every real class);
            boxes of other classes are left out (a warning says how many).
        split: how messages name the split (default: the folder name).
        log: the logger to report through (default: this module's).
    Returns:
        dict with ``images``, ``boxes``, ``dropped_degenerate``, ``dropped_outside``,
        ``clipped``, ``images_without_boxes``, ``categories`` (kept names), ``left_out``
        ({class name: boxes left out by ``classes``}) and ``path``.
    Raises:
        DataError: the file is missing (a ``FileNotFoundError`` too), not COCO JSON, refers to
            unknown image or category ids, or ``classes`` names a class it does not have.
    """
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(FILTERED_NAME)
    return _filter(src, dst, classes, _split_name(src, split), log)[0]


def check_roboflow_split(
    split_dir, classes: Optional[Sequence[str]] = None, split=None, mode: Optional[str] = None, log=None
) -> dict:
    """Filter one split of an export (:func:`filter_roboflow_coco`) and check every image it lists.

    Images must exist, decode (header check; ``mode="full"`` decodes them) and have the size the
    annotations give. A passed image check is cached (``rat_plugins.data.validate``).

    Returns:
        the filter's stats.
    Raises:
        DataError: naming the split, the file and the fix.
    """
    split_dir = Path(split_dir)
    src = split_dir / ORIGINAL_NAME
    split = _split_name(src, split)
    stats, images = _filter(src, split_dir / FILTERED_NAME, classes, split, log)
    entries = [ImageEntry(str(split_dir / img["file_name"]), (int(img["width"]), int(img["height"]))) for img in images]
    check_image_files(entries, split, listed_in=str(src), mode=mode)
    return stats
