"""detectron2 datasets: the Roboflow head-detection export and COCO 2017, checked before they are used.

Configs register nothing when loaded: their dataset entries call :func:`head_detection_dicts` /
:func:`coco2017_dicts`, which register the splits when the dataloader is built, and check them
then (``rat_plugins.data.validate``: files exist and decode, boxes, category ids). Before training,
:func:`validate_lazy_config_data` registers and checks every split a config's loaders read and
compares the classes with the model's ``num_classes``; :class:`CheckedMapper` turns an image that
fails to load mid-run into one error naming the file and the split.
"""

import logging
from pathlib import Path
from typing import List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.datasets import register_coco_instances

from ..data.paths import dataset_root
from ..data.roboflow import FILTERED_NAME, ORIGINAL_NAME, check_roboflow_split, count_images
from ..data.subset import FRACTION_SEED, fraction_indices
from ..data.validate import (
    DataError,
    ImageEntry,
    MissingDataError,
    check_coco_detection,
    check_image,
    check_image_files,
    ensure_readable,
    image_problem,
    model_num_classes,
)
from ..utils.config_keys import did_you_mean

__all__ = [
    "CheckedMapper",
    "checked_mapper",
    "coco2017_dicts",
    "dataset_fraction",
    "head_detection_dicts",
    "head_detection_mapper",
    "head_detection_num_images",
    "register_coco2017",
    "register_head_detection",
    "register_custom_coco",
    "validate_lazy_config_data",
]

# A child of detectron2's logger, so that data warnings reach its console and the run's log.txt
# (before detectron2 sets up its logger they still reach stderr).
logger = logging.getLogger("detectron2.rat_plugins.data")
SPLITS = ("train", "valid", "test")
HEAD_DETECTION = "head_detection"
# earlier name of the head-detection splits ("heads_train", ...), still registered beside the new one
_LEGACY_NAMES = {HEAD_DETECTION: "heads"}
# split -> (annotation file, image folder), relative to the coco2017/ folder
COCO2017_SPLITS = {
    "train": ("annotations/instances_train2017.json", "train2017"),
    "val": ("annotations/instances_val2017.json", "val2017"),
}


def _class_list(classes) -> Optional[List[str]]:
    if classes is None:
        return None
    return [str(classes)] if isinstance(classes, str) else [str(c) for c in classes]


def _stamp(path: Path) -> Optional[List[int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _registered_elsewhere(
    name: str, json_file: Path, image_root: Path, classes: Optional[List[str]] = None, source: Optional[Path] = None
):
    """None: ``name`` is free. False: registered with these paths and classes, from the same
    annotation file (``source``, unchanged since): nothing to do. True: it was registered otherwise;
    that registration is removed so the caller can register (and check) anew."""
    if name not in DatasetCatalog.list():
        return None
    meta = MetadataCatalog.get(name)
    registered = (meta.get("json_file"), meta.get("image_root"), meta.get("filter_classes"), meta.get("source_stamp"))
    if registered == (str(json_file), str(image_root), classes, _stamp(source or json_file)):
        return False
    if registered[:3] == (str(json_file), str(image_root), classes):
        logger.info("re-registering %s: %s changed since it was registered", name, source or json_file)
    else:
        logger.warning(
            "re-registering %s: %s (classes %s) -> %s (classes %s)",
            name,
            registered[0],
            registered[2],
            json_file,
            classes,
        )
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    return True


def _head_detection_root(root) -> Path:
    return Path(root) if root is not None else dataset_root() / "coco"


def register_head_detection(
    root=None, name=HEAD_DETECTION, splits=SPLITS, classes: Optional[Sequence[str]] = None, mode: Optional[str] = None
) -> dict:
    """Register and check ``<root>/{train,valid,test}/_annotations.coco.json`` as ``<name>_<split>``.

    detectron2 reads the filtered copy written beside each original (see
    :func:`rat_plugins.data.roboflow.filter_roboflow_coco`). Every split is checked when it is
    registered (:func:`rat_plugins.data.roboflow.check_roboflow_split`), so a broken test split
    fails when the training loader is built. Registering the same folder and classes again is a
    no-op; another folder or other classes under the same name replace the earlier registration
    (with a warning).

    Args:
        root: the export's folder (default ``<dataset root>/coco``).
        name: prefix of the registered dataset names (the default also registers ``heads_<split>``).
        splits: the splits to register.
        classes: the class names to train, in the model's order (default: every real class of
            the export); boxes of other classes are left out, with a warning.
        mode: the image check, ``header`` or ``full`` (default ``$RAT_DATA_CHECK``, else header).
    Returns:
        {split: stats dict of the filtering}; empty for splits registered before.
    Raises:
        DataError: naming the split, the file and the fix.
    """
    root = _head_detection_root(root)
    classes = _class_list(classes)
    names = [name] + ([_LEGACY_NAMES[name]] if name in _LEGACY_NAMES else [])
    stats = {}
    for split in splits:
        split_dir = root / split
        json_file, source = split_dir / FILTERED_NAME, split_dir / ORIGINAL_NAME
        if _registered_elsewhere(f"{name}_{split}", json_file, split_dir, classes, source) is False:
            continue
        stats[split] = check_roboflow_split(split_dir, classes=classes, split=f"{name}_{split}", mode=mode, log=logger)
        for dataset_name in (f"{prefix}_{split}" for prefix in names):
            if _registered_elsewhere(dataset_name, json_file, split_dir, classes, source) is not False:
                register_coco_instances(dataset_name, {}, str(json_file), str(split_dir))
            MetadataCatalog.get(dataset_name).set(
                thing_classes=stats[split]["categories"],
                num_images=stats[split]["images"],
                num_boxes=stats[split]["boxes"],
                filter_classes=classes,
                source_stamp=_stamp(source),
            )
    return stats


register_custom_coco = register_head_detection  # earlier name


def _dataset_dicts(names, **kwargs):
    """``get_detection_dataset_dicts`` with its emptiness asserts as errors that say the fix."""
    try:
        return get_detection_dataset_dicts(names, **kwargs)
    except AssertionError as e:
        raise DataError(
            f"{names}: {e or 'no data'} With filter_empty=True (the training default) only images with boxes "
            "are kept: annotate the split's images, or pass filter_empty=False"
        ) from e


def head_detection_dicts(names, root=None, classes: Optional[Sequence[str]] = None, **kwargs):
    """``get_detection_dataset_dicts(names, **kwargs)`` after registering the head-detection splits.

    ``classes``: see :func:`register_head_detection` (give every loader of a config the same).
    """
    register_head_detection(root, classes=classes)
    return _dataset_dicts(names, **kwargs)


def dataset_fraction(dataset, fraction: float, seed: int = FRACTION_SEED) -> list:
    """A fixed, seeded ``fraction`` of a split's records (``train.dataset_fraction``), in their order."""
    dataset = list(dataset)
    kept = [dataset[i] for i in fraction_indices(len(dataset), fraction, seed)]
    logger.info("dataset_fraction=%s: training on %d of %d images (seed %d)", fraction, len(kept), len(dataset), seed)
    return kept


def head_detection_num_images(split: str = "train", root=None) -> int:
    """Images in a head-detection split, read from its annotation file (no registration, no writing)."""
    return count_images(_head_detection_root(root) / split / ORIGINAL_NAME)


def _coco2017_fix(root: Path) -> str:
    return (
        f"Unzip train2017.zip, val2017.zip and annotations_trainval2017.zip from cocodataset.org into {root}/ "
        "(layout: datasets/README.md, section coco2017/; $RAT_DATASETS names the folder that holds coco2017/), "
        f"or make the synthetic sample: python -m rat_plugins.data.synthetic coco --out {root}"
    )


def register_coco2017(root=None, names=("train", "val"), mode: Optional[str] = None) -> list:
    """Register and check COCO 2017 at ``<root>/{annotations,train2017,val2017}`` as ``coco2017_<split>``.

    detectron2's builtin ``coco_2017_*`` names point at ``<dataset root>/coco/``, which here holds
    the head-detection export, hence names of our own. Each split is checked when registered
    (:func:`rat_plugins.data.validate.check_coco_detection`, cached); ``thing_classes`` are the
    annotation file's categories (80 for real COCO, fewer for the synthetic set). Calling again
    with the same paths is a no-op; other paths replace the earlier registration (with a warning).

    Args:
        root: the ``coco2017`` folder (default ``<dataset root>/coco2017``).
        names: splits to register, out of ``"train"`` and ``"val"``.
        mode: the image check, ``header`` or ``full`` (default ``$RAT_DATA_CHECK``, else header).
    Returns:
        the registered dataset names.
    Raises:
        MissingDataError: an annotation file or image folder is missing (a FileNotFoundError).
        DataError: a split that cannot be used as it is.
    """
    root = Path(root) if root is not None else dataset_root() / "coco2017"
    unknown = [split for split in names if split not in COCO2017_SPLITS]
    if unknown:
        raise DataError(f"unknown COCO 2017 splits {unknown}; choose from {list(COCO2017_SPLITS)}")
    registered = []
    for split in names:
        ann, img = (root / rel for rel in COCO2017_SPLITS[split])
        missing = ([] if ann.is_file() else [f"annotation file {ann}"]) + (
            [] if img.is_dir() else [f"image folder {img}/"]
        )
        if missing:
            raise MissingDataError(f"COCO 2017 ({split}): missing {' and '.join(missing)}. {_coco2017_fix(root)}")
        name = f"coco2017_{split}"
        if _registered_elsewhere(name, ann, img) is not False:  # free, or held by other paths
            report = check_coco_detection(ann, img, name, mode=mode, fix_missing=_coco2017_fix(root), log=logger)
            register_coco_instances(name, {}, str(ann), str(img))
            # the same names load_coco_json sets when it reads the file (categories in id order)
            MetadataCatalog.get(name).set(
                thing_classes=report["classes"],
                num_images=report["images"],
                num_boxes=report["boxes"],
                filter_classes=None,
                source_stamp=_stamp(ann),
            )
        registered.append(name)
    return registered


def coco2017_dicts(names, root=None, **kwargs):
    """``get_detection_dataset_dicts(names, **kwargs)`` after registering COCO 2017."""
    register_coco2017(root)
    return _dataset_dicts(names, **kwargs)


# ----------------------------------------------------------------------------- mappers


class CheckedMapper:
    """A detectron2 mapper whose unreadable images are one :class:`DataError` naming file and split.

    Before the mapper runs, the image is checked cheaply (it exists and ends as a complete JPEG /
    PNG); when the mapper fails, the image is decoded to tell a damaged file (DataError) from
    any other failure (raised as it is).
    """

    def __init__(self, mapper, split: Optional[str] = None):
        self.mapper = mapper
        self.split = split

    def __call__(self, dataset_dict):
        from detectron2.data.detection_utils import SizeMismatchError

        where = self.split or "dataset"
        path = dataset_dict.get("file_name")
        if path:
            ensure_readable(path, where)
        try:
            return self.mapper(dataset_dict)
        except DataError:
            raise
        except SizeMismatchError as e:
            raise DataError(f"{where}: {e}") from e
        except Exception as e:
            for key, what in (("file_name", "image"), ("sem_seg_file_name", "mask")):
                if dataset_dict.get(key) and image_problem(dataset_dict[key], "full"):
                    try:
                        check_image(dataset_dict[key], where, mode="full", what=what)
                    except DataError as bad:
                        raise bad from e
            raise

    def __repr__(self) -> str:
        return f"CheckedMapper({self.mapper!r}, split={self.split!r})"


def checked_mapper(mapper_target, split: Optional[str] = None, **kwargs) -> CheckedMapper:
    """``CheckedMapper(<mapper_target>(**kwargs), split)``: a config's mapper entry, checked in place
    (:func:`validate_lazy_config_data` rewrites mapper entries to this, keeping their arguments)."""
    from detectron2.utils.registry import locate

    target = locate(mapper_target) if isinstance(mapper_target, str) else mapper_target
    return CheckedMapper(target(**kwargs), split)


def head_detection_mapper(is_train: bool, image_size: int = 640, flip: bool = True, split: Optional[str] = None):
    """DatasetMapper for the head set: fixed square resize (the export is 640x640), flip in training;
    an image that cannot be read is a DataError naming it and ``split``."""
    from detectron2.data import DatasetMapper, transforms as T

    augs = [T.Resize((image_size, image_size))]
    if is_train and flip:
        augs.append(T.RandomFlip(horizontal=True))
    return CheckedMapper(DatasetMapper(is_train=is_train, augmentations=augs, image_format="RGB"), split)


# ----------------------------------------------------------------------------- whole configs


def _target(node):
    from detectron2.utils.registry import locate

    target = node.get("_target_") if hasattr(node, "get") else None
    return locate(target) if isinstance(target, str) else target


def _names(names) -> List[str]:
    return [names] if isinstance(names, str) else [str(n) for n in names]


def _check_other_dataset(name: str, mode: Optional[str]) -> None:
    """A dataset registered by other code: its dicts' images exist and decode."""
    dicts = DatasetCatalog.get(name)
    entries = [
        ImageEntry(d["file_name"], (int(d["width"]), int(d["height"])) if "width" in d and "height" in d else None)
        for d in dicts
        if d.get("file_name")
    ]
    check_image_files(entries, name, mode=mode)


def _guard_mapper(loader, label: str) -> None:
    """Make the loader's mapper a CheckedMapper, in place (relative interpolations keep resolving)."""
    from detectron2.utils.registry import _convert_target_to_string

    mapper = loader.get("mapper") if hasattr(loader, "get") else None
    target = _target(mapper) if mapper is not None else None
    if target is None:
        return
    if target in (head_detection_mapper, checked_mapper, CheckedMapper):
        if target is not CheckedMapper and mapper.get("split") is None:
            mapper["split"] = label
        return
    mapper["mapper_target"] = _convert_target_to_string(target)
    mapper["split"] = label
    mapper["_target_"] = checked_mapper


def _classes_fix(cfg, key: str, target, classes: List[str], path: str) -> str:
    k = len(classes)
    if target is head_detection_dicts:
        where = (
            "dataloader.classes" if "classes" in cfg.dataloader else f"dataloader.{key}.dataset.classes (every loader)"
        )
        return (
            f"To train only some classes, name them: {where}=[{classes[0]}] (register_head_detection(classes=...)); "
            f"to train all {k}, set {path}={k}"
        )
    return f"Set {path}={k}, or train on an annotation file that holds only the classes you want"


def validate_lazy_config_data(cfg, mode: Optional[str] = None) -> None:
    """Check every split a detectron2 LazyConfig's loaders read, and their classes, before training.

    For each ``cfg.dataloader.<key>`` with a ``dataset``: its splits are registered and checked
    (``head_detection_dicts`` / ``coco2017_dicts`` entries; datasets registered by other code:
    their images), the ``train`` split must have boxes, every loader the same classes, and the
    number of classes must equal every ``num_classes`` under ``cfg.model`` (``roi_heads``, the
    cascade's box predictors, RetinaNet's ``num_classes``; RPNs are class-agnostic). Each loader's
    mapper is made a :class:`CheckedMapper` in ``cfg`` (in place), so that an image that fails to
    load mid-run names its file and split.

    Args:
        cfg: the loaded LazyConfig (overrides applied).
        mode: the image check, ``header`` or ``full`` (default ``$RAT_DATA_CHECK``, else header).
    Raises:
        DataError: naming the loader / split, the file and the fix.
    """
    if "dataloader" not in cfg:
        return
    loaders = [
        (key, cfg.dataloader[key])
        for key in list(cfg.dataloader.keys())
        if hasattr(cfg.dataloader[key], "get") and "dataset" in cfg.dataloader[key]
    ]
    head_filters = {
        key: _class_list(loader.dataset.get("classes"))
        for key, loader in loaders
        if _target(loader.dataset) is head_detection_dicts
    }
    if len({tuple(c) if c is not None else None for c in head_filters.values()}) > 1:
        raise DataError(
            f"the head-detection loaders name different classes {head_filters}: the splits are registered together, "
            "so give every loader the same classes (dataloader.classes=[...])"
        )
    counts = model_num_classes(cfg.model, "model") if "model" in cfg else []
    first = None  # (loader key, classes) of the first loader
    for key, loader in loaders:
        dataset = loader.dataset
        target = _target(dataset)
        names = _names(dataset.get("names", []))
        if target is head_detection_dicts:
            register_head_detection(dataset.get("root"), classes=head_filters[key], mode=mode)
        elif target is coco2017_dicts:
            register_coco2017(dataset.get("root"), mode=mode)
        known = DatasetCatalog.list()
        for name in names:
            if name not in known:
                raise DataError(
                    f"dataloader.{key}.dataset.names: dataset {name!r} is not registered.{did_you_mean(name, known)}"
                )
            if target not in (head_detection_dicts, coco2017_dicts):
                _check_other_dataset(name, mode)
            meta = MetadataCatalog.get(name)
            if key == "train" and meta.get("num_boxes") == 0:
                raise DataError(
                    f"{name} (dataloader.train): the training split has no usable box; annotate its images "
                    "(dropped boxes are listed in the warnings above)"
                )
            classes = list(meta.get("thing_classes") or [])
            if not classes:
                continue
            if first is None:
                first = (key, classes)
            elif classes != first[1]:
                raise DataError(
                    f"{name} (dataloader.{key}) has the classes {classes} but dataloader.{first[0]} {first[1]}; "
                    "every split must have the same classes in the same order"
                )
            for path, n in counts:
                if n != len(classes):
                    effect = "some would train as background" if n < len(classes) else "some would have no data"
                    raise DataError(
                        f"{name} (dataloader.{key}): the data has {len(classes)} classes {classes} but {path} is "
                        f"{n} ({effect}). " + _classes_fix(cfg, key, target, classes, path)
                    )
        _guard_mapper(loader, ",".join(names))
