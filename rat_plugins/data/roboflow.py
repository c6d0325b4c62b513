"""Roboflow COCO exports: a clean copy without the supercategory entry and invalid boxes.

Roboflow lists the supercategory as a category of its own next to the real class (see
docs/formats.md, Roboflow COCO export), which would make a 1-class detector train with 2 classes.
"""

import json
import logging
from pathlib import Path

from ..utils.atomic import atomic_write_json

__all__ = ["count_images", "filter_roboflow_coco", "FILTERED_NAME", "ORIGINAL_NAME"]

logger = logging.getLogger(__name__)
ORIGINAL_NAME = "_annotations.coco.json"
FILTERED_NAME = "_annotations.coco_filtered.json"


def _load_coco(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file not found: {path}. Place the Roboflow export so that "
            f"{path.parent}/ holds {ORIGINAL_NAME} and the images (see datasets/README.md), or make "
            f"the sample: python -m rat_plugins.data.synthetic heads --out {path.parent.parent}"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-export it from Roboflow") from e
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"{path} is not a COCO annotation file: missing keys {missing}")
    return data


def _real_categories(categories, annotations):
    """Categories that are classes: drop entries that only name another category's supercategory."""
    used = {a["category_id"] for a in annotations}
    super_names = {c.get("supercategory") for c in categories}
    real = [c for c in categories if not (c["name"] in super_names and c["id"] not in used)]
    return sorted(real, key=lambda c: c["id"])


def count_images(path) -> int:
    """Images listed in a COCO annotation file (the filtered copy keeps them all); writes nothing."""
    return len(_load_coco(Path(path))["images"])


def filter_roboflow_coco(src, dst=None) -> dict:
    """Write the filtered copy of a Roboflow COCO file; return counts of what was changed.

    The copy (``_annotations.coco_filtered.json`` beside the original, which is never edited) has
    only the real classes, ids remapped to 1..K, boxes clipped to the image, degenerate boxes dropped.

    Args:
        src: path of ``_annotations.coco.json``.
        dst: output path (default: ``_annotations.coco_filtered.json`` beside ``src``).
    Returns:
        dict with ``images``, ``boxes``, ``dropped_degenerate``, ``dropped_outside``,
        ``clipped``, ``images_without_boxes``, ``categories`` (kept names) and ``path``.
    """
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(FILTERED_NAME)
    if dst.resolve() == src.resolve():
        raise ValueError(f"refusing to overwrite the original annotations {src}")
    data = _load_coco(src)
    categories = _real_categories(data["categories"], data["annotations"])
    if not categories:
        raise ValueError(f"{src} has no category with annotations")
    new_id = {c["id"]: i + 1 for i, c in enumerate(categories)}
    images = {img["id"]: img for img in data["images"]}

    kept, degenerate, outside, clipped = [], 0, 0, 0
    for ann in data["annotations"]:
        if ann["image_id"] not in images:
            raise ValueError(f"{src}: annotation {ann.get('id')} refers to unknown image id {ann['image_id']}")
        if ann["category_id"] not in new_id:
            raise ValueError(
                f"{src}: annotation {ann.get('id')} uses category {ann['category_id']}, "
                f"which is only a supercategory entry"
            )
        img = images[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0:
            degenerate += 1
            continue
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(img["width"])), min(y + h, float(img["height"]))
        if x1 <= x0 or y1 <= y0:
            outside += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            clipped += 1
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
        dropped_degenerate=degenerate,
        dropped_outside=outside,
        clipped=clipped,
        images_without_boxes=len(images) - len(with_boxes),
        categories=[c["name"] for c in categories],
    )
    logger.info(
        "%s: %d images, %d boxes kept, %d dropped (zero/negative size), %d dropped (outside "
        "the image), %d clipped, %d images without boxes, classes %s",
        src,
        stats["images"],
        stats["boxes"],
        degenerate,
        outside,
        clipped,
        stats["images_without_boxes"],
        stats["categories"],
    )
    return stats
