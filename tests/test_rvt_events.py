"""RVT-layout event clips: discovery, clip sampling, label scaling, errors, mmdet dataset and CocoMetric.

Every test reads files written here in RVT's exact layout by the synthetic ``events`` generator
(32x32 histograms, 12 representations, a label every 2nd).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from rat_plugins.data.rvt_events import REPR_FILE, REPR_FILE_DS2, RVTEventClips
from rat_plugins.data.synthetic import EVENT_REPR_NAME, make_events

torch.set_num_threads(1)

# Deliberately not eTraM's names: the loader must take whatever the config gives.
CLASSES = tuple(f"kind{i}" for i in range(8))
L = 4


@pytest.fixture(scope="module")
def events_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("events") / "synthetic"
    make_events(root, n=2, seed=3, size=32, frames=12, label_every=2)
    return root


def _repr_dir(root, split, seq):
    return Path(root) / split / seq / "event_representations_v2" / EVENT_REPR_NAME


def _raw(root, split, seq):
    """What the files hold, read independently of the loader."""
    d = _repr_dir(root, split, seq)
    with h5py.File(d / REPR_FILE_DS2, "r") as f:
        data = f["data"][()]
    npz = np.load(Path(root) / split / seq / "labels_v2" / "labels.npz")
    return data, np.load(d / "objframe_idx_2_repr_idx.npy"), npz["labels"], npz["objframe_idx_2_label_idx"]


def _xyxy(rows):
    return np.stack([rows["x"], rows["y"], rows["x"] + rows["w"], rows["y"] + rows["h"]], 1).astype(np.float64)


def _frame_rows(labels, starts, k):
    end = starts[k + 1] if k + 1 < len(starts) else len(labels)
    return labels[starts[k] : end]


def test_discovers_sequences_and_one_clip_per_labelled_frame(events_root):
    clips = RVTEventClips(events_root, "train", CLASSES, sequence_length=L)
    folders = sorted(p.name for p in (events_root / "train").iterdir())
    assert [s.name for s in clips.sequences] == folders and len(folders) == 2
    n_frames = sum(len(_raw(events_root, "train", s)[1]) for s in folders)
    assert len(clips) == n_frames
    assert (clips.channels, clips.height, clips.width) == (20, 32, 32)
    assert clips.class_names == CLASSES
    assert not clips._handles, "the constructor must not keep HDF5 files open"


def test_clip_ends_at_labelled_frame_with_its_labels(events_root):
    clips = RVTEventClips(events_root, "train", CLASSES, sequence_length=L)
    raw = {s.name: _raw(events_root, "train", s.name) for s in clips.sequences}
    for i in range(len(clips)):
        sample = clips[i]
        data, repr_idx, labels, starts = raw[sample["sequence"]]
        k, end = sample["objframe_idx"], sample["repr_idx"]
        assert end == repr_idx[k]
        assert sample["clip"].shape == (L, 20, 32, 32) and sample["clip"].dtype == np.uint8
        assert np.array_equal(sample["clip"][-1], data[end])
        expected_idx = np.arange(end - L + 1, end + 1)
        assert np.array_equal(sample["repr_indices"], np.where(expected_idx >= 0, expected_idx, -1))
        for t, r in enumerate(expected_idx):
            assert np.array_equal(sample["clip"][t], data[r] if r >= 0 else np.zeros_like(data[0]))
        rows = _frame_rows(labels, starts, k)
        assert len(rows) > 0
        np.testing.assert_allclose(sample["bboxes"], _xyxy(rows) * 0.5, rtol=0, atol=1e-5)
        assert np.array_equal(sample["labels"], rows["class_id"].astype(np.int64))


def test_short_clips_padded_in_front_with_masks(events_root):
    clips = RVTEventClips(events_root, "train", CLASSES, sequence_length=L)
    first = clips[0]  # the first labelled frame of the first sequence: representation 1
    assert first["repr_idx"] == 1
    assert first["valid"].tolist() == [False, False, True, True]
    assert first["is_first"].tolist() == [False, False, True, False]
    assert first["starts_sequence"] is True
    assert not first["clip"][:2].any(), "padding must be zeros"
    full = next(clips[i] for i in range(len(clips)) if clips[i]["repr_idx"] >= L)
    assert full["valid"].all() and full["is_first"].tolist() == [True, False, False, False]
    assert full["starts_sequence"] is False


def test_short_clips_dropped_like_rvt(events_root):
    padded = RVTEventClips(events_root, "train", CLASSES, sequence_length=L)
    dropped = RVTEventClips(events_root, "train", CLASSES, sequence_length=L, short_clips="drop")
    keep = [i for i in range(len(padded)) if padded.sample_info(i)["repr_idx"] >= L - 1]
    assert 0 < len(dropped) == len(keep) < len(padded)
    for j, i in enumerate(keep):
        assert dropped.sample_info(j)["repr_idx"] == padded.sample_info(i)["repr_idx"]
        assert dropped[j]["valid"].all()
    with pytest.raises(ValueError, match="short_clips"):
        RVTEventClips(events_root, "train", CLASSES, short_clips="wrap")


def test_labels_of_every_labelled_step(events_root):
    clips = RVTEventClips(events_root, "train", CLASSES, sequence_length=6, all_labels=True)
    raw = {s.name: _raw(events_root, "train", s.name) for s in clips.sequences}
    sample = clips[len(clips) - 1]
    _, repr_idx, labels, starts = raw[sample["sequence"]]
    assert sample["labelled"].sum() == 3  # label_every=2 over 6 steps
    for t, r in enumerate(sample["repr_indices"]):
        hit = np.flatnonzero(repr_idx == r)
        assert sample["labelled"][t] == bool(hit.size)
        if hit.size:
            rows = _frame_rows(labels, starts, int(hit[0]))
            np.testing.assert_allclose(sample["step_bboxes"][t], _xyxy(rows) * 0.5, atol=1e-5)
            assert np.array_equal(sample["step_labels"][t], rows["class_id"])
        else:
            assert sample["step_bboxes"][t].shape == (0, 4) and sample["step_labels"][t].shape == (0,)
    np.testing.assert_allclose(sample["step_bboxes"][-1], sample["bboxes"])


def test_full_resolution_file_keeps_sensor_pixels(events_root, tmp_path):
    root = tmp_path / "events"
    shutil.copytree(events_root / "val", root / "val")
    seq = sorted(p.name for p in (root / "val").iterdir())[0]
    d = _repr_dir(root, "val", seq)
    with h5py.File(d / REPR_FILE_DS2, "r") as f:
        small = f["data"][()]
    with h5py.File(d / REPR_FILE, "w") as f:  # the sensor grid: each ds2 pixel repeated 2x2
        f.create_dataset("data", data=small.repeat(2, axis=2).repeat(2, axis=3), compression="gzip")
    ds2 = RVTEventClips(root, "val", CLASSES, sequence_length=2)
    full = RVTEventClips(root, "val", CLASSES, sequence_length=2, downsample=False)
    assert (full.height, full.width) == (64, 64) and (ds2.height, ds2.width) == (32, 32)
    _, _, labels, starts = _raw(root, "val", seq)
    for i in range(len(full)):
        k = full.sample_info(i)["objframe_idx"]
        expected = _xyxy(_frame_rows(labels, starts, k))
        np.testing.assert_allclose(full.sample_info(i)["bboxes"], expected, atol=1e-4)
        np.testing.assert_allclose(ds2.sample_info(i)["bboxes"], expected / 2, atol=1e-4)
        assert full[i]["clip"].shape == (2, 20, 64, 64)
    assert ds2.sample_info(0)["bboxes"].max() <= 32 and full.sample_info(0)["bboxes"].max() <= 64


def test_error_messages_name_the_file_and_the_fix(events_root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"split folder .*nosuch.* does not exist.*synthetic events"):
        RVTEventClips(events_root, "nosuch", CLASSES)
    with pytest.raises(
        FileNotFoundError, match=r"stacked_histogram_dt=25.*found .*stacked_histogram_dt=50.*set repr_name"
    ):
        RVTEventClips(events_root, "val", CLASSES, repr_name="stacked_histogram_dt=25_nbins=10")
    with pytest.raises(FileNotFoundError, match=r"event_representations\.h5.*downsample=True"):
        RVTEventClips(events_root, "val", CLASSES, downsample=False)
    with pytest.raises(ValueError, match=r"labels\.npz' has class id \d+ but class_names has 3"):
        RVTEventClips(events_root, "train", CLASSES[:3])
    with pytest.raises(ValueError, match="class_names is empty"):
        RVTEventClips(events_root, "train", [])

    root = tmp_path / "events"
    shutil.copytree(events_root / "val", root / "val")
    seq = sorted(p.name for p in (root / "val").iterdir())[0]
    h5_path = _repr_dir(root, "val", seq) / REPR_FILE_DS2
    h5_path.write_bytes(b"not an hdf5 file" * 64)
    with pytest.raises(OSError, match=rf"{h5_path.name}.*corrupt"):
        RVTEventClips(root, "val", CLASSES)
    with h5py.File(h5_path, "w") as f:
        f.create_dataset("histogram", data=np.zeros((2, 2, 4, 4), np.uint8))
    with pytest.raises(OSError, match="no dataset 'data'"):
        RVTEventClips(root, "val", CLASSES)


_BLOSC_CHECK = r"""
import sys
sys.modules["hdf5plugin"] = None  # as if it were not installed
from rat_plugins.data.rvt_events import RVTEventClips
try:
    RVTEventClips(sys.argv[1], "val", [str(i) for i in range(8)])
except ImportError as e:
    print("IMPORTERROR", e)
else:
    print("NO ERROR")
"""


def test_blosc_files_read_with_hdf5plugin_and_say_so_without(events_root, tmp_path):
    import hdf5plugin

    root = tmp_path / "events"
    shutil.copytree(events_root / "val", root / "val")
    seq = sorted(p.name for p in (root / "val").iterdir())[0]
    h5_path = _repr_dir(root, "val", seq) / REPR_FILE_DS2
    with h5py.File(h5_path, "r") as f:
        data = f["data"][()]
    with h5py.File(h5_path, "w") as f:  # how RVT's downloads are compressed
        f.create_dataset("data", data=data, chunks=(1,) + data.shape[1:], **hdf5plugin.Blosc(cname="zstd"))
    clips = RVTEventClips(root, "val", CLASSES, sequence_length=2)
    assert np.array_equal(clips[0]["clip"][-1], data[clips[0]["repr_idx"]])
    proc = subprocess.run(
        [sys.executable, "-c", _BLOSC_CHECK, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert "IMPORTERROR" in proc.stdout, proc.stdout + proc.stderr
    assert "blosc" in proc.stdout.lower() and "pip install hdf5plugin" in proc.stdout


# ----------------------------------------------------------------------------- mmdet


@pytest.fixture(scope="module")
def mm():
    from mmdet.registry import DATASETS, METRICS

    import rat_plugins.mm  # noqa: F401  (registers RVTEventDataset, PackEventClip)

    return DATASETS, METRICS


def _build(DATASETS, cfg):
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("mmdet"):  # what default_scope='mmdet' in a config does
        return DATASETS.build(cfg)


def _dataset_cfg(root, split, **extra):
    cfg = dict(
        type="RVTEventDataset",
        data_root=str(root),
        split=split,
        metainfo=dict(classes=CLASSES),
        sequence_length=L,
        pipeline=[dict(type="PackEventClip")],
    )
    cfg.update(extra)
    return cfg


def test_mmdet_dataset_builds_and_packs_clips(mm, events_root):
    DATASETS, _ = mm
    ds = _build(DATASETS, _dataset_cfg(events_root, "train", all_labels=True))
    reader = RVTEventClips(events_root, "train", CLASSES, sequence_length=L)
    assert len(ds) == len(reader) and ds.metainfo["classes"] == CLASSES
    info = ds.get_data_info(0)
    assert (info["width"], info["height"]) == (32, 32)
    np.testing.assert_allclose([a["bbox"] for a in info["instances"]], reader.sample_info(0)["bboxes"], atol=1e-6)
    assert [a["bbox_label"] for a in info["instances"]] == reader.sample_info(0)["labels"].tolist()

    packed = ds[0]
    inputs, sample = packed["inputs"], packed["data_samples"]
    assert inputs.shape == (L, 20, 32, 32) and inputs.dtype == torch.uint8
    assert torch.equal(inputs, torch.from_numpy(reader[0]["clip"]))
    assert sample.ori_shape == (32, 32) and sample.img_id == 0
    assert sample.is_first.tolist() == [False, False, True, False]
    assert sample.valid.tolist() == [False, False, True, True]
    assert torch.allclose(sample.gt_instances.bboxes, torch.from_numpy(reader[0]["bboxes"]))
    assert sample.gt_instances.labels.dtype == torch.long
    assert len(sample.step_gt_instances) == L and len(sample.step_gt_instances[-1]) == len(sample.gt_instances)
    assert sample.instances == info["instances"]

    with pytest.raises(ValueError, match=r"metainfo=dict\(classes="):
        _build(DATASETS, _dataset_cfg(events_root, "train", metainfo=None))


def test_mmdet_dataloader_workers_open_their_own_files(mm, events_root):
    from mmengine.dataset import pseudo_collate
    from torch.utils.data import DataLoader

    DATASETS, _ = mm
    ds = _build(DATASETS, _dataset_cfg(events_root, "train"))
    assert not ds.clips._handles, "building the dataset must not open HDF5 files"
    expected = [ds[i]["inputs"] for i in range(len(ds))]  # opens files in this process before the fork
    assert ds.clips._handles

    def collate_in_worker(batch):  # runs in the worker, on the worker's copy of the dataset
        return pseudo_collate(batch), os.getpid(), ds.clips._owner_pid, len(ds.clips._handles)

    loader = DataLoader(
        ds, batch_size=2, num_workers=2, collate_fn=collate_in_worker, shuffle=False, multiprocessing_context="fork"
    )
    seen, workers = 0, set()
    for batch, worker_pid, owner_pid, open_files in loader:
        assert worker_pid != os.getpid() and owner_pid == worker_pid and open_files >= 1
        workers.add(worker_pid)
        for inputs, sample in zip(batch["inputs"], batch["data_samples"]):
            assert torch.equal(inputs, expected[sample.img_id])
            seen += 1
    assert seen == len(ds) and len(workers) == 2


def _evaluate(mm, root, drop_class=None):
    from mmengine.structures import InstanceData

    DATASETS, METRICS = mm
    ds = _build(DATASETS, _dataset_cfg(root, "train", test_mode=True))
    metric = METRICS.build(dict(type="CocoMetric", ann_file=None, metric="bbox", classwise=True))
    metric.dataset_meta = ds.metainfo
    for i in range(len(ds)):
        sample = ds[i]["data_samples"]
        gt = sample.gt_instances
        keep = gt.labels != drop_class if drop_class is not None else torch.ones(len(gt), dtype=torch.bool)
        sample.pred_instances = InstanceData(
            bboxes=gt.bboxes[keep], labels=gt.labels[keep], scores=torch.ones(int(keep.sum()))
        )
        metric.process({}, [sample.to_dict()])
    return metric.evaluate(len(ds)), ds


def test_coco_metric_scores_perfect_predictions_one(mm, events_root):
    results, ds = _evaluate(mm, events_root)
    assert results["coco/bbox_mAP"] == 1.0 and results["coco/bbox_mAP_50"] == 1.0
    assert results["coco/bbox_mAP_s"] == 1.0  # 32x32 histograms: every box is small
    present = {a["bbox_label"] for i in range(len(ds)) for a in ds.get_data_info(i)["instances"]}
    assert len(present) >= 2
    for c, name in enumerate(CLASSES):
        ap = results[f"coco/{name}_precision"]
        assert ap == 1.0 if c in present else np.isnan(ap)


def test_coco_metric_sees_a_missing_class(mm, events_root):
    full, ds = _evaluate(mm, events_root)
    present = sorted({a["bbox_label"] for i in range(len(ds)) for a in ds.get_data_info(i)["instances"]})
    results, _ = _evaluate(mm, events_root, drop_class=present[0])
    assert results[f"coco/{CLASSES[present[0]]}_precision"] == 0.0
    assert results[f"coco/{CLASSES[present[1]]}_precision"] == 1.0
    assert results["coco/bbox_mAP"] < full["coco/bbox_mAP"]
