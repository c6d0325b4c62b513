"""The datasets (and the event-clip packing transform) registered into mmseg and mmdet.

- ``RoboflowCocoDataset`` (mmdet): a Roboflow COCO export, read through its filtered copy;
- ``ISIC2018Dataset`` (mmseg): ISIC 2018 Task 1 in its original layout; the pipeline yields one
  image per sample and the RAT backbone builds its pyramid from it (``model.backbone.scales``);
- ``RVTEventDataset`` + ``PackEventClip`` (mmdet): clips of RVT's preprocessed event layout,
  evaluated by mmdet's ``CocoMetric(ann_file=None)`` from the fields ``PackEventClip`` packs.

File formats: docs/formats.md.
"""

import os.path as osp
from typing import List, Optional, Sequence

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmdet.datasets import BaseDetDataset, CocoDataset
from mmdet.registry import DATASETS as MMDET_DATASETS, TRANSFORMS as MMDET_TRANSFORMS
from mmdet.structures import DetDataSample
from mmengine import fileio
from mmengine.structures import InstanceData
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS as MMSEG_DATASETS

from ..data.isic_layout import ISIC_FOLDERS
from ..data.roboflow import filter_roboflow_coco
from ..data.rvt_events import DEFAULT_REPR_NAME, RVTEventClips

__all__ = ["RoboflowCocoDataset", "ISIC2018Dataset", "RVTEventDataset", "PackEventClip"]


@MMDET_DATASETS.register_module()
class RoboflowCocoDataset(CocoDataset):
    """CocoDataset over a Roboflow export's original ``_annotations.coco.json``.

    Reads the filtered copy (supercategory entry removed, invalid boxes dropped) that
    :func:`rat_plugins.data.roboflow.filter_roboflow_coco` writes beside the original; the
    class names come from the file unless ``metainfo`` sets them.
    """

    def load_data_list(self):
        stats = filter_roboflow_coco(self.ann_file)
        if not self._metainfo.get("classes"):
            self._metainfo["classes"] = tuple(stats["categories"])
        self.ann_file = stats["path"]
        return super().load_data_list()


@MMSEG_DATASETS.register_module()
class ISIC2018Dataset(BaseSegDataset):
    """ISIC 2018 Task 1 (binary lesion segmentation) in its original folder layout.

    Args:
        split: ``'Training'``, ``'Validation'`` or ``'Test'``: sets ``data_prefix`` to that split's
            input and ground-truth folders. None: give ``data_prefix`` yourself.
        img_suffix: image suffix (``.jpg``; ``ATTRIBUTION.txt`` / ``LICENSE.txt`` are skipped).
        seg_map_suffix: mask suffix (``_segmentation.png``).
        **kwargs: ``BaseSegDataset`` arguments (``data_root``, ``pipeline``, ``data_prefix``, ...).
    """

    METAINFO = dict(classes=("background", "lesion"), palette=[[0, 0, 0], [255, 255, 255]])

    def __init__(
        self, split: Optional[str] = None, img_suffix: str = ".jpg", seg_map_suffix: str = "_segmentation.png", **kwargs
    ):
        if split is not None:
            if split not in ISIC_FOLDERS:
                raise ValueError(f"ISIC2018Dataset: split must be one of {sorted(ISIC_FOLDERS)}, got {split!r}")
            if kwargs.get("data_prefix"):
                raise ValueError("ISIC2018Dataset: give split or data_prefix, not both")
            img_dir, gt_dir = ISIC_FOLDERS[split]
            kwargs["data_prefix"] = dict(img_path=img_dir, seg_map_path=gt_dir)
        self.split = split
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix, reduce_zero_label=False, **kwargs)

    @classmethod
    def get_label_map(cls, new_classes=None):
        """Masks store the lesion as 255: map it to class 1 (``LoadAnnotations`` applies this)."""
        if new_classes is not None and tuple(new_classes) != cls.METAINFO["classes"]:
            raise ValueError(f"ISIC2018Dataset has the classes {cls.METAINFO['classes']}, got {tuple(new_classes)}")
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
                raise FileNotFoundError(f"ISIC2018Dataset: {kind} folder {folder!r} does not exist; {layout}")
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
            raise FileNotFoundError(f"ISIC2018Dataset: no *{self.img_suffix} image in {img_dir}; {layout}")
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
            raise FileNotFoundError("ISIC2018Dataset: image / mask pairs do not match; " + "; ".join(problems))
        return [
            dict(
                img_path=osp.join(img_dir, name + self.img_suffix),
                seg_map_path=osp.join(ann_dir, name + self.seg_map_suffix),
                label_map=self.label_map,
                reduce_zero_label=self.reduce_zero_label,
                seg_fields=[],
            )
            for name in images
        ]


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
        repr_name, downsample, sequence_length, short_clips, all_labels: see
            :class:`~rat_plugins.data.rvt_events.RVTEventClips`.
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
        **kwargs,
    ):
        self.split = split
        self.clip_args = dict(
            repr_name=repr_name,
            downsample=downsample,
            sequence_length=sequence_length,
            short_clips=short_clips,
            all_labels=all_labels,
        )
        self.clips: Optional[RVTEventClips] = None
        super().__init__(*args, **kwargs)

    def load_data_list(self):
        classes = self._metainfo.get("classes")
        if not classes:
            raise ValueError(
                "RVTEventDataset needs the class names in the config: "
                "metainfo=dict(classes=(...)), one name per class id of the labels"
            )
        if not self.data_root:
            raise ValueError(
                "RVTEventDataset needs data_root, the folder holding train/ val/ test/ (e.g. 'datasets/events/etram')"
            )
        self.clips = RVTEventClips(self.data_root, self.split, classes, **self.clip_args)
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
        return self.pipeline(results)


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
      the ``meta_keys`` present in the results.
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
