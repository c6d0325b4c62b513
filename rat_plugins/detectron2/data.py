"""Dataset registration for detectron2: the Roboflow head-detection export."""
import logging
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from ..data.paths import dataset_root
from ..data.roboflow import FILTERED_NAME, ORIGINAL_NAME, filter_roboflow_coco

__all__ = ["register_custom_coco", "num_images", "head_detection_mapper"]

logger = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")


def register_custom_coco(root=None, name="heads", splits=SPLITS) -> dict:
    """Register ``<root>/{train,valid,test}/_annotations.coco.json`` as ``<name>_<split>``.

    Each split gets ``_annotations.coco_filtered.json`` beside its original (see
    :func:`rat_plugins.data.roboflow.filter_roboflow_coco`), which is what detectron2 reads.
    Registering again under the same name is a no-op, so configs can call this at load time.

    Args:
        root: the export's folder (default ``<dataset root>/coco``).
        name: prefix of the registered dataset names.
    Returns:
        {split: stats dict of the filtering}; empty for splits registered before.
    """
    root = Path(root) if root is not None else dataset_root() / "coco"
    stats = {}
    for split in splits:
        dataset_name = f"{name}_{split}"
        if dataset_name in DatasetCatalog.list():
            continue
        split_dir = root / split
        stats[split] = filter_roboflow_coco(split_dir / ORIGINAL_NAME, split_dir / FILTERED_NAME)
        register_coco_instances(dataset_name, {}, str(split_dir / FILTERED_NAME), str(split_dir))
        MetadataCatalog.get(dataset_name).set(thing_classes=stats[split]["categories"],
                                              num_images=stats[split]["images"])
    return stats


def num_images(dataset_name: str) -> int:
    """Images in a registered split, read from the annotation file without loading the images."""
    meta = MetadataCatalog.get(dataset_name)
    if not hasattr(meta, "num_images"):
        raise KeyError(f"dataset {dataset_name!r} is not registered; call register_custom_coco() first")
    return meta.num_images


def head_detection_mapper(is_train: bool, image_size: int = 640, flip: bool = True):
    """DatasetMapper for the head set: fixed square resize (the export is 640x640), flip in training."""
    from detectron2.data import DatasetMapper
    from detectron2.data import transforms as T

    augs = [T.Resize((image_size, image_size))]
    if is_train and flip:
        augs.append(T.RandomFlip(horizontal=True))
    return DatasetMapper(is_train=is_train, augmentations=augs, image_format="RGB")
