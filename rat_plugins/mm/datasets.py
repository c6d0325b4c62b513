"""The datasets (and the event-clip packing transform) registered into mmseg and mmdet.

- ``RoboflowCocoDataset`` (mmdet): a Roboflow COCO export, read through its filtered copy;
- ``ISIC2018Dataset`` (mmseg): ISIC 2018 Task 1 in its original layout; the pipeline yields one
  image per sample and the RAT backbone builds its pyramid from it (``model.backbone.scales``);
- ``RVTEventDataset`` + ``PackEventClip`` (mmdet): clips of RVT's preprocessed event layout,
  evaluated by mmdet's ``CocoMetric(ann_file=None)`` from the fields ``PackEventClip`` packs;
- ``DatasetFraction`` (mmengine, so both scopes): a fixed, seeded fraction of a dataset (the config
  key ``dataset_fraction``).

Each dataset checks its split when it loads (``rat_plugins.data.validate``: files exist and decode,
masks have their image's size, boxes, classes) and names the file and split of a sample that
cannot be read mid-run. :func:`validate_config_datasets` builds and checks every loader's dataset
of a config at start, and compares the classes with the model's ``num_classes``.

File formats: docs/formats.md.
"""

import copy
import logging
import os.path as osp
import re
from typing import List, Optional, Sequence

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmdet.datasets import BaseDetDataset, CocoDataset
from mmdet.registry import (
    DATA_SAMPLERS as MMDET_DATA_SAMPLERS,
    DATASETS as MMDET_DATASETS,
    TRANSFORMS as MMDET_TRANSFORMS,
)
from mmdet.structures import DetDataSample
from mmengine import fileio
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.structures import InstanceData
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS as MMSEG_DATASETS

from ..data.isic_layout import ISIC_FOLDERS
from ..data.roboflow import check_roboflow_split
from ..data.rvt_events import DEFAULT_REPR_NAME, MixedSchedule, RVTEventClips, stream_schedule
from ..data.subset import FRACTION_SEED, fraction_indices
from ..data.validate import (
    DataError,
    ImageEntry,
    MissingDataError,
    check_image,
    check_image_files,
    ensure_readable,
    image_problem,
    model_num_classes,
)

__all__ = [
    "DatasetFraction",
    "RoboflowCocoDataset",
    "ISIC2018Dataset",
    "RVTEventDataset",
    "RVTStreamingSampler",
    "RVTMixedSampler",
    "PackEventClip",
    "check_config_dataset",
    "validate_config_datasets",
]

LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
IGNORE_INDEX = 255  # mmseg's default ignore_index: a mask may hold it besides the class values


def _mm_logger() -> logging.Logger:
    """The current mmengine logger: data warnings go to its console and the run's log file."""
    from mmengine.logging import MMLogger

    return MMLogger.get_current_instance()


class _CheckedSamples:
    """``prepare_data`` that names the file and the split of a sample that cannot be read.

    Before the pipeline runs, the sample's image / mask are checked cheaply (they exist and end
    as a complete JPEG / PNG); when the pipeline fails, they are decoded to tell a damaged file
    (a DataError) from any other failure (raised as it is).
    """

    split_label = "dataset"

    def prepare_data(self, idx):
        info = self.get_data_info(idx)
        files = [(info[key], what) for key, what in (("img_path", "image"), ("seg_map_path", "mask")) if info.get(key)]
        for path, what in files:
            ensure_readable(path, self.split_label, what)
        try:
            return super().prepare_data(idx)
        except DataError:
            raise
        except Exception as e:
            for path, what in files:
                if image_problem(path, "full"):
                    try:
                        check_image(path, self.split_label, mode="full", what=what)
                    except DataError as bad:
                        raise bad from e
            raise


@MMENGINE_DATASETS.register_module()
class DatasetFraction(torch.utils.data.Dataset):
    """A fixed, seeded ``fraction`` of ``dataset`` (a config dict or a dataset), in its order: the same
    samples in every run of a sweep, whatever the run's own seed."""

    def __init__(self, dataset, fraction: float, seed: int = FRACTION_SEED):
        self.dataset = MMENGINE_DATASETS.build(dataset) if isinstance(dataset, dict) else dataset
        self.fraction, self.seed = fraction, seed
        self.indices = fraction_indices(len(self.dataset), fraction, seed)
        self.metainfo = copy.deepcopy(self.dataset.metainfo)
        _mm_logger().info(
            "dataset_fraction=%s: training on %d of %d samples (seed %d)",
            fraction,
            len(self.indices),
            len(self.dataset),
            seed,
        )

    def full_init(self) -> None:  # built whole in __init__ (mmengine's loaders call it)
        pass

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


@MMDET_DATASETS.register_module()
class RoboflowCocoDataset(_CheckedSamples, CocoDataset):
    """CocoDataset over a Roboflow export's original ``_annotations.coco.json``.

    Reads the filtered copy (supercategory entry removed, invalid boxes dropped and reported) that
    :func:`rat_plugins.data.roboflow.filter_roboflow_coco` writes beside the original, after
    checking every image of the split (:func:`rat_plugins.data.roboflow.check_roboflow_split`).
    The class names come from the file unless ``metainfo=dict(classes=...)`` names the classes to
    train: boxes of the file's other classes are then left out, with a warning.

    Args:
        data_check: ``header`` / ``full`` image check (default ``$RAT_DATA_CHECK``, else header).
        **kwargs: ``CocoDataset`` arguments.
    """

    # No default classes: CocoDataset's are COCO's 80, which would match no class of the export
    # and leave every box out.
    METAINFO = dict(classes=(), palette=CocoDataset.METAINFO["palette"])

    def __init__(self, *args, data_check: Optional[str] = None, **kwargs):
        self.data_check = data_check
        super().__init__(*args, **kwargs)

    def load_data_list(self):
        classes = self._metainfo.get("classes") or None
        split_dir = osp.dirname(self.ann_file)
        self.split_label = f"{osp.basename(split_dir)} split"
        stats = check_roboflow_split(
            split_dir, classes=classes, split=self.split_label, mode=self.data_check, log=_mm_logger()
        )
        if not classes:
            self._metainfo["classes"] = tuple(stats["categories"])
        self.ann_file = stats["path"]
        return super().load_data_list()


@MMSEG_DATASETS.register_module()
class ISIC2018Dataset(_CheckedSamples, BaseSegDataset):
    """ISIC 2018 Task 1 (binary lesion segmentation) in its original folder layout.

    Every image and mask of the split is checked when it loads: they pair up, decode, and a mask
    has its image's size and one channel (``data_check="full"``: decoded, mask values 0 / 255).

    Args:
        split: ``'Training'``, ``'Validation'`` or ``'Test'``: sets ``data_prefix`` to that split's
            input and ground-truth folders. None: give ``data_prefix`` yourself.
        img_suffix: image suffix (``.jpg``; ``ATTRIBUTION.txt`` / ``LICENSE.txt`` are skipped).
        seg_map_suffix: mask suffix (``_segmentation.png``).
        data_check: ``header`` / ``full`` (default ``$RAT_DATA_CHECK``, else header).
        **kwargs: ``BaseSegDataset`` arguments (``data_root``, ``pipeline``, ``data_prefix``, ...).
    """

    METAINFO = dict(classes=("background", "lesion"), palette=[[0, 0, 0], [255, 255, 255]])

    def __init__(
        self,
        split: Optional[str] = None,
        img_suffix: str = ".jpg",
        seg_map_suffix: str = "_segmentation.png",
        data_check: Optional[str] = None,
        **kwargs,
    ):
        if split is not None:
            if split not in ISIC_FOLDERS:
                raise DataError(f"ISIC2018Dataset: split must be one of {sorted(ISIC_FOLDERS)}, got {split!r}")
            if kwargs.get("data_prefix"):
                raise DataError("ISIC2018Dataset: give split or data_prefix, not both")
            img_dir, gt_dir = ISIC_FOLDERS[split]
            kwargs["data_prefix"] = dict(img_path=img_dir, seg_map_path=gt_dir)
        self.split = split
        self.split_label = f"ISIC 2018 {split or 'data'} split"
        self.data_check = data_check
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, reduce_zero_label=False, **kwargs)

    @classmethod
    def get_label_map(cls, new_classes=None):
        """Masks store the lesion as 255: map it to class 1 (``LoadAnnotations`` applies this)."""
        if new_classes is not None and tuple(new_classes) != cls.METAINFO["classes"]:
            raise DataError(
                f"ISIC2018Dataset has the classes {cls.METAINFO['classes']}, got {tuple(new_classes)}; "
                "leave metainfo.classes out of the config"
            )
        return {0: 0, 255: 1}

    def load_data_list(self) -> List[dict]:
        img_dir = self.data_prefix.get("img_path", "")
        ann_dir = self.data_prefix.get("seg_map_path", "")
        layout = (
            "expected the ISIC 2018 Task 1 layout: <data_root>/ISIC2018_Task1-2_<Split>_Input/ISIC_XXXXXXX.jpg "
            "and <data_root>/ISIC2018_Task1_<Split>_GroundTruth/ISIC_XXXXXXX_segmentation.png "
            "(docs/formats.md, ISIC 2018 Task 1; a synthetic stand-in: "
            "python -m rat_plugins.data.synthetic isic --out DIR)"
        )
        for kind, folder in (("image", img_dir), ("mask", ann_dir)):
            if not folder or not osp.isdir(folder):
                raise MissingDataError(
                    f"ISIC2018Dataset ({self.split_label}): {kind} folder {folder!r} does not exist; {layout}"
                )
        images = sorted(
            f[: -len(self.img_suffix)]
            for f in fileio.list_dir_or_file(
                img_dir, list_dir=False, suffix=self.img_suffix, recursive=False, backend_args=self.backend_args
            )
        )
        masks = sorted(
            f[: -len(self.seg_map_suffix)]
            for f in fileio.list_dir_or_file(
                ann_dir, list_dir=False, suffix=self.seg_map_suffix, recursive=False, backend_args=self.backend_args
            )
        )
        if not images:
            raise MissingDataError(
                f"ISIC2018Dataset ({self.split_label}): no *{self.img_suffix} image in {img_dir}; the split is "
                f"empty: {layout}"
            )
        no_mask = sorted(set(images) - set(masks))
        no_image = sorted(set(masks) - set(images))
        if no_mask or no_image:
            problems = []
            if no_mask:
                problems.append(
                    f"{len(no_mask)} image(s) in {img_dir} without a mask in {ann_dir}: "
                    f"{_first_few(no_mask, self.img_suffix)}"
                )
            if no_image:
                problems.append(
                    f"{len(no_image)} mask(s) in {ann_dir} without an image in {img_dir}: "
                    f"{_first_few(no_image, self.seg_map_suffix)}"
                )
            raise MissingDataError(
                f"ISIC2018Dataset ({self.split_label}): image / mask pairs do not match; "
                + "; ".join(problems)
                + "; restore the missing files (copy the split again) or remove the unpaired ones"
            )
        data_list = [
            dict(
                img_path=osp.join(img_dir, name + self.img_suffix),
                seg_map_path=osp.join(ann_dir, name + self.seg_map_suffix),
                label_map=self.label_map,
                reduce_zero_label=self.reduce_zero_label,
                seg_fields=[],
            )
            for name in images
        ]
        check_image_files(
            [ImageEntry(d["img_path"], mask=d["seg_map_path"]) for d in data_list],
            self.split_label,
            mode=self.data_check,
            mask_values=_mask_values(self),
        )
        return data_list


def _mask_values(dataset) -> set:
    """The raw values a mask of ``dataset`` may hold: the label map's keys, the class ids, ignore."""
    label_map = dataset.metainfo.get("label_map") or {}
    return set(label_map) | set(range(len(dataset.metainfo.get("classes") or ()))) | {IGNORE_INDEX}


def _first_few(names: List[str], suffix: str) -> str:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(n + suffix for n in names[:5]) + more


@MMDET_DATASETS.register_module()
class RVTEventDataset(BaseDetDataset):
    """One sample per labelled frame of a split in RVT's preprocessed layout.

    ``data_list`` holds what evaluation needs without reading events (``img_id``, ``width``,
    ``height``, ``instances`` with ``bbox`` xyxy / ``bbox_label`` / ``ignore_flag``); the clip itself
    is read in :meth:`prepare_data`, in the worker, through
    :class:`rat_plugins.data.rvt_events.RVTEventClips` (HDF5 opened lazily per process).

    Args:
        split: folder under ``data_root`` (``train`` / ``val`` / ``test``).
        repr_name, downsample, sequence_length, short_clips, all_labels, sampling: see
            :class:`~rat_plugins.data.rvt_events.RVTEventClips`. ``sampling="streaming"`` is RVT's
            evaluation: segments that stream each recording, for a model that carries its state
            (``RecurrentYOLOX`` does for samples with ``stream_end`` in their metainfo) and
            ``sampler=dict(type='RVTStreamingSampler')``, which keeps each recording's segments in
            order.
        data_check: ``header`` / ``full`` (``RVTEventClips``' ``check``).
        **kwargs: mmengine ``BaseDataset`` arguments; ``data_root`` is the dataset folder and
            ``metainfo=dict(classes=...)`` is required (class names are the config's).
    """

    METAINFO = dict(classes=())

    def __init__(
        self,
        *args,
        split: str = "train",
        repr_name: str = DEFAULT_REPR_NAME,
        downsample: bool = True,
        sequence_length: int = 5,
        short_clips: str = "pad",
        all_labels: bool = False,
        data_check: Optional[str] = None,
        sampling: str = "random",
        **kwargs,
    ):
        self.split = split
        self.clip_args = dict(
            sampling=sampling,
            repr_name=repr_name,
            downsample=downsample,
            sequence_length=sequence_length,
            short_clips=short_clips,
            all_labels=all_labels,
            check=data_check,
        )
        self.clips: Optional[RVTEventClips] = None
        super().__init__(*args, **kwargs)

    def load_data_list(self):
        classes = self._metainfo.get("classes")
        if not classes:
            raise DataError(
                f"RVTEventDataset ({self.split} split) needs the class names in the config: "
                "metainfo=dict(classes=(...)), one name per class id of the labels"
            )
        if not self.data_root:
            raise DataError(
                "RVTEventDataset needs data_root, the folder holding train/ val/ test/ (e.g. 'datasets/events/etram')"
            )
        self.clips = RVTEventClips(self.data_root, self.split, classes, log=_mm_logger(), **self.clip_args)
        data_list = []
        for i in range(len(self.clips)):
            info = self.clips.sample_info(i)
            instances = [
                dict(bbox=[float(v) for v in box], bbox_label=int(label), ignore_flag=0)
                for box, label in zip(info["bboxes"], info["labels"])
            ]
            data_list.append(
                dict(
                    img_id=i,
                    clip_index=i,
                    sequence=info["sequence"],
                    objframe_idx=info["objframe_idx"],
                    repr_idx=info["repr_idx"],
                    timestamp_us=info["timestamp_us"],
                    width=self.clips.width,
                    height=self.clips.height,
                    instances=instances,
                )
            )
        return data_list

    def stream_order(self):
        """Per recording, its samples in time order (:meth:`RVTEventClips.stream_order`)."""
        if not self._fully_initialized:
            self.full_init()
        position = {self.get_data_info(i)["clip_index"]: i for i in range(len(self))}
        return [[position[c] for c in seq if c in position] for seq in self.clips.stream_order()]

    def prepare_data(self, idx):
        results = self.get_data_info(idx)
        sample = self.clips[results["clip_index"]]
        results.update(
            clip=sample["clip"],
            valid=sample["valid"],
            is_first=sample["is_first"],
            labelled=sample["labelled"],
            repr_indices=sample["repr_indices"],
            starts_sequence=sample["starts_sequence"],
            gt_bboxes=sample["bboxes"],
            gt_bboxes_labels=sample["labels"],
        )
        if "step_bboxes" in sample:
            results.update(step_bboxes=sample["step_bboxes"], step_labels=sample["step_labels"])
        if "stream_end" in sample:
            results["stream_end"] = sample["stream_end"]
        return self.pipeline(results)


@MMDET_DATA_SAMPLERS.register_module()
class RVTStreamingSampler(torch.utils.data.Sampler):
    """Streams every recording of an ``RVTEventDataset(sampling='streaming')`` in order, ``streams``
    recordings side by side (:func:`rat_plugins.data.rvt_events.stream_schedule`; set it to the
    loader's batch size, so that each batch holds one segment of each of ``streams`` recordings).

    The order is fixed (RVT's evaluation; no shuffling). One process only: mmengine gathers the
    results of several ranks by interleaving equal shares, which cannot keep recordings whole, so
    evaluate in streaming mode without a launcher.
    """

    def __init__(self, dataset, streams: int = 1, seed: Optional[int] = None):
        from mmengine.dist import get_dist_info

        if not hasattr(dataset, "stream_order"):
            raise TypeError(
                f"RVTStreamingSampler needs a dataset with stream_order() (RVTEventDataset with "
                f"sampling='streaming'), got {type(dataset).__name__}"
            )
        if getattr(dataset, "clip_args", {}).get("sampling") != "streaming":
            raise ValueError(
                "RVTStreamingSampler streams segments: set sampling='streaming' on the RVTEventDataset (random "
                "clips each start from a zero state and need no order)"
            )
        _, world = get_dist_info()
        if world > 1:
            raise RuntimeError(
                f"streaming evaluation runs in one process (this run has {world}): run tools/test.py without "
                "--launcher, or evaluate random-access clips (sampling='random', DefaultSampler) across processes"
            )
        self.order = stream_schedule(dataset.stream_order(), streams)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:  # mmengine calls it every epoch; the order never changes
        pass


def _sampling_parts(dataset):
    """``(random part, streaming part, their offsets in the ConcatDataset)`` of a ConcatDataset of two
    RVTEventDatasets."""
    parts = list(getattr(dataset, "datasets", []))
    modes = [getattr(p, "clip_args", {}).get("sampling") for p in parts]
    if sorted(modes) != ["random", "streaming"]:
        raise ValueError(
            "RVTMixedSampler needs dataset=dict(type='ConcatDataset', datasets=[<RVTEventDataset sampling='random'>, "
            f"<RVTEventDataset sampling='streaming'>]) over the same split; got parts with sampling {modes}"
        )
    random_part, stream_part = parts[modes.index("random")], parts[modes.index("streaming")]
    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + len(p))
    return random_part, stream_part, offsets[modes.index("random")], offsets[modes.index("streaming")]


@MMDET_DATA_SAMPLERS.register_module()
class RVTMixedSampler(torch.utils.data.Sampler):
    """RVT's mixed training sampling (:class:`rat_plugins.data.rvt_events.MixedSchedule`): each batch
    holds ``random_per_batch`` random-access clips and one streamed segment of each of ``streams``
    lanes, whose recordings go on from batch to batch (``RecurrentYOLOX`` carries their states,
    detached). The loader's ``batch_size`` must be ``random_per_batch + streams`` (RVT: 1:1).

    The dataset is a ``ConcatDataset`` of an ``RVTEventDataset(sampling='random')`` and an
    ``RVTEventDataset(sampling='streaming')`` of the same split. Each process streams its own share
    of the recordings. An epoch sees every random clip once.
    """

    def __init__(self, dataset, random_per_batch: int = 1, streams: int = 1, seed: Optional[int] = None):
        from mmengine.dist import get_dist_info, sync_random_seed

        random_part, stream_part, random_offset, stream_offset = _sampling_parts(dataset)
        rank, world = get_dist_info()
        self.seed = sync_random_seed() if seed is None else int(seed)
        self.schedule = MixedSchedule(
            len(random_part), stream_part.stream_order(), random_per_batch, streams, self.seed, rank, world
        )
        self.random_offset, self.stream_offset = random_offset, stream_offset

    def __iter__(self):
        n = self.schedule.num_random
        order = self.schedule.next_epoch()
        return iter([self.random_offset + i if i < n else self.stream_offset + i - n for i in order])

    def __len__(self) -> int:
        return self.schedule.batches_per_epoch() * (self.schedule.random_per_batch + self.schedule.streams)

    def set_epoch(self, epoch: int) -> None:  # mmengine calls it every epoch; the schedule counts its own
        pass


def _instances(boxes: np.ndarray, labels: np.ndarray) -> InstanceData:
    # Plain tensors, which is what mmdet's heads see after DetDataPreprocessor's box-type conversion.
    return InstanceData(
        bboxes=torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
        labels=torch.as_tensor(np.asarray(labels), dtype=torch.long),
    )


@MMDET_TRANSFORMS.register_module()
class PackEventClip(BaseTransform):
    """Pack an event clip and its boxes into ``inputs`` / ``data_samples``.

    mmdet's ``PackDetInputs`` expects an HWC image; a clip is ``[T, C, H, W]`` and stays that way,
    uint8 counts, unnormalised (RVT feeds raw counts). The :class:`DetDataSample` carries:

    - ``gt_instances``: boxes (xyxy tensor) and labels of the clip's final frame;
    - ``step_gt_instances`` (only with ``all_labels=True``): one ``InstanceData`` per step;
    - metainfo ``valid`` / ``is_first`` / ``labelled`` (bool [T]; ``is_first`` is where the
      recurrent state must be reset), ``img_id``, ``ori_shape`` = ``img_shape`` = (H, W),
      ``scale_factor`` (1, 1), ``instances`` (what ``CocoMetric(ann_file=None)`` reads), plus
      the ``meta_keys`` present in the results (``stream_end`` only for streamed segments).
    """

    def __init__(
        self,
        meta_keys: Sequence[str] = (
            "img_id",
            "sequence",
            "objframe_idx",
            "repr_idx",
            "timestamp_us",
            "repr_indices",
            "starts_sequence",
            "stream_end",
            "instances",
        ),
    ):
        self.meta_keys = tuple(meta_keys)

    def transform(self, results: dict) -> dict:
        clip = results["clip"]
        if clip.ndim != 4:
            raise ValueError(f"PackEventClip expects a clip [T, C, H, W], got shape {tuple(clip.shape)}")
        height, width = int(clip.shape[-2]), int(clip.shape[-1])
        sample = DetDataSample()
        sample.gt_instances = _instances(results["gt_bboxes"], results["gt_bboxes_labels"])
        if "step_bboxes" in results:
            sample.step_gt_instances = [
                _instances(b, c) for b, c in zip(results["step_bboxes"], results["step_labels"])
            ]
        meta = dict(
            ori_shape=(height, width),
            img_shape=(height, width),
            scale_factor=(1.0, 1.0),
            valid=torch.as_tensor(results["valid"], dtype=torch.bool),
            is_first=torch.as_tensor(results["is_first"], dtype=torch.bool),
            labelled=torch.as_tensor(results["labelled"], dtype=torch.bool),
        )
        meta.update({k: results[k] for k in self.meta_keys if k in results})
        sample.set_metainfo(meta)
        return dict(inputs=torch.from_numpy(np.ascontiguousarray(clip)), data_samples=sample)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(meta_keys={self.meta_keys})"


# ----------------------------------------------------------------------------- whole configs

_PROJECT_DATASETS = ("RoboflowCocoDataset", "ISIC2018Dataset", "RVTEventDataset")
# mmengine's build_from_cfg re-raises an error as type(e)(f"class `X` in path/to/file.py: {e}")
_BUILD_PREFIX = re.compile(r"^class `[\w.]+` in [^:]+: ")


def _strip_build_prefix(message: str) -> str:
    while _BUILD_PREFIX.match(message):
        message = _BUILD_PREFIX.sub("", message, count=1)
    return message


def _with_data_check(node, mode: str) -> None:
    """Give the project's datasets in a dataset config (wrappers included) the check mode."""
    if isinstance(node, dict):
        if str(node.get("type", "")).split(".")[-1] in _PROJECT_DATASETS:
            node["data_check"] = mode
        for value in node.values():
            _with_data_check(value, mode)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _with_data_check(value, mode)


def _leaves(dataset) -> list:
    """The datasets inside dataset wrappers (ConcatDataset, RepeatDataset, ClassBalancedDataset, ...)."""
    inner = getattr(dataset, "datasets", None)
    if isinstance(inner, (list, tuple)):
        return [leaf for d in inner for leaf in _leaves(d)]
    inner = getattr(dataset, "dataset", None)
    if inner is not None and inner is not dataset and hasattr(inner, "__getitem__"):
        return _leaves(inner)
    return [dataset]


def _classes_fix(loader_key: str, dataset, path: str, k: int) -> str:
    if isinstance(dataset, (RoboflowCocoDataset, RVTEventDataset)) or type(dataset).__name__ == "CocoDataset":
        return (
            f"Name the classes to train with {loader_key}.dataset.metainfo=dict(classes=(...)) on every loader "
            f"(a Roboflow export's other classes are then left out, with a warning), or set {path}={k}"
        )
    return f"Set {path}={k} (the dataset's classes are fixed)"


def _build_dataset(cfg, loader_key: str, mode: Optional[str]):
    from mmengine.registry import DATASETS, DefaultScope

    dataset_cfg = copy.deepcopy(cfg[loader_key]["dataset"])
    if mode is not None:
        _with_data_check(dataset_cfg, mode)
    where = f"{loader_key}.dataset"
    with DefaultScope.overwrite_default_scope(cfg.get("default_scope")):
        try:
            dataset = DATASETS.build(dataset_cfg)
            for leaf in _leaves(dataset):
                if hasattr(leaf, "full_init"):  # lazy_init=True datasets load now
                    leaf.full_init()
        except DataError as e:
            raise type(e)(f"{where}: {_strip_build_prefix(str(e))}") from e
        except OSError as e:  # FileNotFoundError and the like from datasets that are not ours
            raise MissingDataError(f"{where} ({dataset_cfg.get('type')}): {_strip_build_prefix(str(e))}") from e
    return dataset


def check_config_dataset(cfg, loader_key: str, mode: Optional[str] = None) -> dict:
    """Build ``cfg[loader_key].dataset`` in the config's default scope and check it.

    The project's datasets check themselves when they load; others (mmseg's ``DRIVEDataset``,
    mmdet's ``CocoDataset`` ...) get the same file check here (images and masks exist and decode,
    masks of their image's size, annotated sizes). The classes must match every ``num_classes``
    under ``cfg.model`` (``bbox_head``, ``roi_head.bbox_head``, ``decode_head``, ``auxiliary_head``).

    Returns:
        ``dict(loader=, type=, samples=, images=, masks=, classes=, root=)``.
    Raises:
        DataError: naming the loader, the split, the file and the fix.
    """
    dataset = _build_dataset(cfg, loader_key, mode)
    where = f"{loader_key}.dataset"
    images = masks = 0
    for leaf in _leaves(dataset):
        infos = [leaf.get_data_info(i) for i in range(len(leaf))] if hasattr(leaf, "get_data_info") else []
        entries = [
            ImageEntry(
                info["img_path"],
                (int(info["width"]), int(info["height"])) if "width" in info and "height" in info else None,
                info.get("seg_map_path") or None,
            )
            for info in infos
            if info.get("img_path")
        ]
        images += len(entries)
        masks += sum(1 for e in entries if e.mask)
        if not len(leaf):
            drops_empty = (getattr(leaf, "filter_cfg", None) or {}).get("filter_empty_gt")
            filtered = " once filter_cfg left out the images without boxes" if drops_empty else ""
            raise DataError(
                f"{where} ({type(leaf).__name__}): the split is empty{filtered}; put its data in place "
                "(annotate its images) or drop the loader"
            )
        # the project's datasets checked their files when they loaded
        if entries and not isinstance(leaf, (RoboflowCocoDataset, ISIC2018Dataset, RVTEventDataset)):
            seg = isinstance(leaf, BaseSegDataset) and not leaf.metainfo.get("reduce_zero_label")
            check_image_files(
                entries,
                f"{where} ({type(leaf).__name__}, {leaf.data_root or 'data_root unset'})",
                mode=mode,
                mask_values=_mask_values(leaf) if seg else None,
            )
    classes = tuple(dataset.metainfo.get("classes") or ())
    for path, n in model_num_classes(cfg.get("model", {}), "model") if classes else []:
        if n != len(classes):
            effect = "some would train as background" if n < len(classes) else "some would have no data"
            raise DataError(
                f"{where}: the data has {len(classes)} classes {list(classes)} but {path} is {n} ({effect}). "
                + _classes_fix(loader_key, _leaves(dataset)[0], path, len(classes))
            )
    return dict(
        loader=loader_key,
        type=type(dataset).__name__,
        samples=len(dataset),
        images=images,
        masks=masks,
        classes=list(classes),
        root=getattr(dataset, "data_root", None) or "",
    )


def validate_config_datasets(cfg, mode: Optional[str] = None) -> None:
    """Build and check the train / val / test datasets of an mmengine Config before training.

    See :func:`check_config_dataset`; also, every loader must have the same classes. A loader
    whose dataset entry equals an earlier one's (``test_dataloader = val_dataloader``) is checked once.

    Args:
        cfg: the loaded mmengine Config (``--cfg-options`` applied).
        mode: ``header`` / ``full`` (default ``$RAT_DATA_CHECK``, else header).
    Raises:
        DataError: naming the loader, the split, the file and the fix.
    """
    from mmengine.utils import import_modules_from_strings

    if cfg.get("custom_imports"):
        import_modules_from_strings(**cfg.custom_imports)
    checked = []  # (loader key, dataset entry, classes)
    for key in LOADERS:
        loader = cfg.get(key)
        if not loader or not loader.get("dataset"):
            continue
        if any(entry == loader["dataset"] for _, entry, _ in checked):
            continue
        summary = check_config_dataset(cfg, key, mode)
        if checked and checked[0][2] and summary["classes"] and summary["classes"] != checked[0][2]:
            raise DataError(
                f"{key}.dataset has the classes {summary['classes']} but {checked[0][0]}.dataset "
                f"{checked[0][2]}; every split must have the same classes in the same order"
            )
        checked.append((key, loader["dataset"], summary["classes"]))
