"""RVT-layout event clips for mmdet: ``type='RVTEventDataset'`` and the ``type='PackEventClip'`` transform.

Evaluation is mmdet's ``CocoMetric(ann_file=None)``: it builds its ground truth from the fields
:class:`PackEventClip` puts into every sample (``instances``, ``img_id``, ``ori_shape``), with
boxes in pixels of the histogram read. Configs: ``projects/RVT/configs``.
"""
from typing import Optional, Sequence

import numpy as np
import torch
from mmcv.transforms import BaseTransform
from mmdet.datasets import BaseDetDataset
from mmdet.registry import DATASETS as MMDET_DATASETS
from mmdet.registry import TRANSFORMS as MMDET_TRANSFORMS
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData

from ..data.rvt_events import DEFAULT_REPR_NAME, RVTEventClips

__all__ = ["RVTEventDataset", "PackEventClip"]


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

    def __init__(self, *args, split: str = "train", repr_name: str = DEFAULT_REPR_NAME, downsample: bool = True,
                 sequence_length: int = 5, short_clips: str = "pad", all_labels: bool = False, **kwargs):
        self.split = split
        self.clip_args = dict(repr_name=repr_name, downsample=downsample, sequence_length=sequence_length,
                              short_clips=short_clips, all_labels=all_labels)
        self.clips: Optional[RVTEventClips] = None
        super().__init__(*args, **kwargs)

    def load_data_list(self):
        classes = self._metainfo.get("classes")
        if not classes:
            raise ValueError("RVTEventDataset needs the class names in the config: "
                             "metainfo=dict(classes=(...)), one name per class id of the labels")
        if not self.data_root:
            raise ValueError("RVTEventDataset needs data_root, the folder holding train/ val/ test/ "
                             "(e.g. 'datasets/events/etram')")
        self.clips = RVTEventClips(self.data_root, self.split, classes, **self.clip_args)
        data_list = []
        for i in range(len(self.clips)):
            info = self.clips.sample_info(i)
            instances = [dict(bbox=[float(v) for v in box], bbox_label=int(label), ignore_flag=0)
                         for box, label in zip(info["bboxes"], info["labels"])]
            data_list.append(dict(img_id=i, clip_index=i, sequence=info["sequence"],
                                  objframe_idx=info["objframe_idx"], repr_idx=info["repr_idx"],
                                  timestamp_us=info["timestamp_us"], width=self.clips.width,
                                  height=self.clips.height, instances=instances))
        return data_list

    def prepare_data(self, idx):
        results = self.get_data_info(idx)
        sample = self.clips[results["clip_index"]]
        results.update(clip=sample["clip"], valid=sample["valid"], is_first=sample["is_first"],
                       labelled=sample["labelled"], repr_indices=sample["repr_indices"],
                       starts_sequence=sample["starts_sequence"], gt_bboxes=sample["bboxes"],
                       gt_bboxes_labels=sample["labels"])
        if "step_bboxes" in sample:
            results.update(step_bboxes=sample["step_bboxes"], step_labels=sample["step_labels"])
        return self.pipeline(results)


def _instances(boxes: np.ndarray, labels: np.ndarray) -> InstanceData:
    # Plain tensors, which is what mmdet's heads see after DetDataPreprocessor's box-type conversion.
    return InstanceData(bboxes=torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
                        labels=torch.as_tensor(np.asarray(labels), dtype=torch.long))


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

    def __init__(self, meta_keys: Sequence[str] = ("img_id", "sequence", "objframe_idx", "repr_idx", "timestamp_us",
                                                    "repr_indices", "starts_sequence", "instances")):
        self.meta_keys = tuple(meta_keys)

    def transform(self, results: dict) -> dict:
        clip = results["clip"]
        if clip.ndim != 4:
            raise ValueError(f"PackEventClip expects a clip [T, C, H, W], got shape {tuple(clip.shape)}")
        height, width = int(clip.shape[-2]), int(clip.shape[-1])
        sample = DetDataSample()
        sample.gt_instances = _instances(results["gt_bboxes"], results["gt_bboxes_labels"])
        if "step_bboxes" in results:
            sample.step_gt_instances = [_instances(b, c) for b, c in
                                        zip(results["step_bboxes"], results["step_labels"])]
        meta = dict(ori_shape=(height, width), img_shape=(height, width), scale_factor=(1.0, 1.0),
                    valid=torch.as_tensor(results["valid"], dtype=torch.bool),
                    is_first=torch.as_tensor(results["is_first"], dtype=torch.bool),
                    labelled=torch.as_tensor(results["labelled"], dtype=torch.bool))
        meta.update({k: results[k] for k in self.meta_keys if k in results})
        sample.set_metainfo(meta)
        return dict(inputs=torch.from_numpy(np.ascontiguousarray(clip)), data_samples=sample)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(meta_keys={self.meta_keys})"
