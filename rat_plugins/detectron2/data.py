"""detectron2 datasets: the Roboflow head-detection export and COCO 2017.

Configs register nothing when loaded: their dataset entries call :func:`head_detection_dicts` /
:func:`coco2017_dicts`, which register the splits when the dataloader is built.
"""

import logging
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.datasets import register_coco_instances

from ..data.paths import dataset_root
from ..data.roboflow import FILTERED_NAME, ORIGINAL_NAME, count_images, filter_roboflow_coco

__all__ = [
    "coco2017_dicts",
    "head_detection_dicts",
    "head_detection_mapper",
    "head_detection_num_images",
    "register_coco2017",
    "register_head_detection",
    "register_custom_coco",
]

logger = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
HEAD_DETECTION = "head_detection"
# earlier name of the head-detection splits ("heads_train", ...), still registered beside the new one
_LEGACY_NAMES = {HEAD_DETECTION: "heads"}
# split -> (annotation file, image folder), relative to the coco2017/ folder
COCO2017_SPLITS = {
    "train": ("annotations/instances_train2017.json", "train2017"),
    "val": ("annotations/instances_val2017.json", "val2017"),
}


def _registered_elsewhere(name: str, json_file: Path, image_root: Path):
    """None: ``name`` is free. False: registered with these paths (nothing to do). True: it was
    registered with other paths; that registration is removed so the caller can register anew."""
    if name not in DatasetCatalog.list():
        return None
    meta = MetadataCatalog.get(name)
    if (meta.get("json_file"), meta.get("image_root")) == (str(json_file), str(image_root)):
        return False
    logger.warning("re-registering %s: %s -> %s", name, meta.get("json_file"), json_file)
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    return True


def _head_detection_root(root) -> Path:
    return Path(root) if root is not None else dataset_root() / "coco"


def register_head_detection(root=None, name=HEAD_DETECTION, splits=SPLITS) -> dict:
    """Register ``<root>/{train,valid,test}/_annotations.coco.json`` as ``<name>_<split>``.

    detectron2 reads the filtered copy written beside each original (see
    :func:`rat_plugins.data.roboflow.filter_roboflow_coco`). Registering the same folder again is a
    no-op; another folder under the same name replaces the earlier registration (with a warning).

    Args:
        root: the export's folder (default ``<dataset root>/coco``).
        name: prefix of the registered dataset names (the default also registers ``heads_<split>``).
    Returns:
        {split: stats dict of the filtering}; empty for splits registered before.
    """
    root = _head_detection_root(root)
    names = [name] + ([_LEGACY_NAMES[name]] if name in _LEGACY_NAMES else [])
    stats = {}
    for split in splits:
        split_dir = root / split
        if _registered_elsewhere(f"{name}_{split}", split_dir / FILTERED_NAME, split_dir) is False:
            continue
        stats[split] = filter_roboflow_coco(split_dir / ORIGINAL_NAME, split_dir / FILTERED_NAME)
        for dataset_name in (f"{prefix}_{split}" for prefix in names):
            if _registered_elsewhere(dataset_name, split_dir / FILTERED_NAME, split_dir) is not False:
                register_coco_instances(dataset_name, {}, str(split_dir / FILTERED_NAME), str(split_dir))
            MetadataCatalog.get(dataset_name).set(
                thing_classes=stats[split]["categories"], num_images=stats[split]["images"]
            )
    return stats


register_custom_coco = register_head_detection  # earlier name


def head_detection_dicts(names, root=None, **kwargs):
    """``get_detection_dataset_dicts(names, **kwargs)`` after registering the head-detection splits."""
    register_head_detection(root)
    return get_detection_dataset_dicts(names, **kwargs)


def head_detection_num_images(split: str = "train", root=None) -> int:
    """Images in a head-detection split, read from its annotation file (no registration, no writing)."""
    return count_images(_head_detection_root(root) / split / ORIGINAL_NAME)


def register_coco2017(root=None, names=("train", "val")) -> list:
    """Register COCO 2017 at ``<root>/{annotations,train2017,val2017}`` as ``coco2017_<split>``.

    detectron2's builtin ``coco_2017_*`` names point at ``<dataset root>/coco/``, which here holds
    the head-detection export, hence names of our own. ``thing_classes`` come from the annotation
    file when detectron2 first loads it (80 for real COCO, fewer for the synthetic set). Calling
    again with the same paths is a no-op; other paths replace the earlier registration (with a warning).

    Args:
        root: the ``coco2017`` folder (default ``<dataset root>/coco2017``).
        names: splits to register, out of ``"train"`` and ``"val"``.
    Returns:
        the registered dataset names.
    Raises:
        FileNotFoundError: an annotation file or image folder is missing.
    """
    root = Path(root) if root is not None else dataset_root() / "coco2017"
    unknown = [split for split in names if split not in COCO2017_SPLITS]
    if unknown:
        raise ValueError(f"unknown COCO 2017 splits {unknown}; choose from {list(COCO2017_SPLITS)}")
    registered = []
    for split in names:
        ann, img = (root / rel for rel in COCO2017_SPLITS[split])
        missing = ([] if ann.is_file() else [f"annotation file {ann}"]) + (
            [] if img.is_dir() else [f"image folder {img}/"]
        )
        if missing:
            raise FileNotFoundError(
                f"COCO 2017 ({split}): missing {' and '.join(missing)}. Unzip train2017.zip, val2017.zip "
                f"and annotations_trainval2017.zip from cocodataset.org into {root}/ (layout: datasets/README.md, "
                f"section coco2017/; $RAT_DATASETS names the folder that holds coco2017/), or make the "
                f"synthetic sample: python -m rat_plugins.data.synthetic coco --out {root}"
            )
        name = f"coco2017_{split}"
        if _registered_elsewhere(name, ann, img) is not False:  # free, or held by other paths
            register_coco_instances(name, {}, str(ann), str(img))
        registered.append(name)
    return registered


def coco2017_dicts(names, root=None, **kwargs):
    """``get_detection_dataset_dicts(names, **kwargs)`` after registering COCO 2017."""
    register_coco2017(root)
    return get_detection_dataset_dicts(names, **kwargs)


def head_detection_mapper(is_train: bool, image_size: int = 640, flip: bool = True):
    """DatasetMapper for the head set: fixed square resize (the export is 640x640), flip in training."""
    from detectron2.data import DatasetMapper, transforms as T

    augs = [T.Resize((image_size, image_size))]
    if is_train and flip:
        augs.append(T.RandomFlip(horizontal=True))
    return DatasetMapper(is_train=is_train, augmentations=augs, image_format="RGB")
