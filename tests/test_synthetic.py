"""The synthetic dataset generators: exact layouts, determinism, imperfections, signal, CLI."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rat_plugins.data import synthetic as syn

REPO = Path(__file__).resolve().parents[1]

# Small but complete settings, shared by the fixtures and the determinism test.
SMALL = {
    "heads": dict(n=4, size=160),
    "isic": dict(n=2, size=(48, 80)),
    "isic-context": dict(n=8, size=64),
    "fundus": dict(n=2, size=48),
    "events": dict(n=1, size=32, frames=8),
    "coco": dict(n=3, size=192),
}


def _tree(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """kind -> (root, summary), generated once per module with seed 0."""
    cache = {}

    def get(kind, **extra):
        key = (kind, tuple(sorted(extra.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(kind) / "ds"
            summary = syn.GENERATORS[kind](root, seed=0, **SMALL[kind], **extra)
            cache[key] = (root, summary)
        return cache[key]

    return get


# ----------------------------------------------------------------------------- common properties


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_deterministic_and_seeded(kind, made, tmp_path):
    if kind == "events":
        pytest.importorskip("h5py")
    root, summary = made(kind)
    again = syn.GENERATORS[kind](tmp_path / "again", seed=0, **SMALL[kind])
    first, second = _tree(root), _tree(tmp_path / "again")
    assert first and first == second
    assert summary["files"] == len(first)  # the summary counts every file; no temp files left
    assert not [p for p in first if Path(p).name.startswith(".")]
    assert {k: v for k, v in again.items() if k != "out"} == {k: v for k, v in summary.items() if k != "out"}
    other = syn.GENERATORS[kind](tmp_path / "other", seed=1, **SMALL[kind])
    third = _tree(tmp_path / "other")
    data = [p for p in first if Path(p).suffix in {".jpg", ".tif", ".h5", ".npz", ".json"}]
    assert data and all(third.get(p) != first[p] for p in data)  # every image / label file changes
    assert other["seed"] == 1


def test_refuses_non_empty_folder_and_overwrite_keeps_foreign_files(tmp_path):
    out = tmp_path / "fundus"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(syn.DatasetExistsError, match=str(out)):
        syn.make_fundus(out, n=1, size=32)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    syn.make_fundus(out, n=1, size=32, overwrite=True)
    (out / "training" / "stale.tif").write_bytes(b"old")
    syn.make_fundus(out, n=1, size=32, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "training" / "stale.tif").exists()  # owned folders are replaced
    assert (out / "training" / "images" / "21_training.tif").is_file()
    # a second layout nests beside the raw one without --overwrite
    syn.make_fundus(out / "drive_mmseg", n=1, size=32, layout="mmseg")
    with pytest.raises(syn.DatasetExistsError):
        syn.make_fundus(out, n=1, size=32)


def test_cli_writes_and_prints_one_json_line(tmp_path):
    out = tmp_path / "coco"
    cmd = [
        sys.executable,
        "-m",
        "rat_plugins.data.synthetic",
        "heads",
        "--out",
        str(out),
        "--n",
        "4",
        "--size",
        "64",
        "--seed",
        "3",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["kind"] == "heads" and summary["seed"] == 3 and summary["image_size"] == [64, 64]
    for split in ("train", "valid", "test"):
        doc = json.loads((out / split / "_annotations.coco.json").read_text())
        assert len(doc["images"]) == summary["splits"][split]["images"]
        assert len(doc["annotations"]) == summary["splits"][split]["annotations"]
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "non-empty" in again.stderr and str(out) in again.stderr
    assert again.stdout == ""


# ----------------------------------------------------------------------------- heads


def test_heads_roboflow_layout(made):
    from pycocotools.coco import COCO

    root, summary = made("heads")
    assert sorted(p.name for p in root.iterdir()) == ["test", "train", "valid"]
    for split, count in (("train", 4), ("valid", 4), ("test", 4)):
        folder = root / split
        doc = json.loads((folder / "_annotations.coco.json").read_text())
        assert {"info", "licenses", "categories", "images", "annotations"} <= set(doc)
        assert doc["categories"] == [
            {"id": 0, "name": "heads", "supercategory": "none"},
            {"id": 1, "name": "head", "supercategory": "heads"},
        ]
        assert len(doc["images"]) == count
        names = {im["file_name"] for im in doc["images"]}
        assert names == {p.name for p in folder.glob("*.jpg")}
        for im in doc["images"]:
            assert "/" not in im["file_name"] and ".rf." in im["file_name"]
            with Image.open(folder / im["file_name"]) as img:
                assert img.format == "JPEG" and img.mode == "RGB" and img.size == (160, 160)
            assert (im["width"], im["height"]) == (160, 160)
        for a in doc["annotations"]:
            assert a["category_id"] == 1 and a["iscrowd"] == 0 and a["segmentation"] == []
            assert len(a["bbox"]) == 4 and all(isinstance(v, float) for v in a["bbox"])
            assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], abs=0.01)
        coco = COCO(str(folder / "_annotations.coco.json"))
        assert sorted(coco.getCatIds()) == [0, 1]
        assert len(coco.getAnnIds(catIds=[1])) == len(doc["annotations"]) == summary["splits"][split]["annotations"]


def _heads_stats(doc):
    w = {im["id"]: im["width"] for im in doc["images"]}
    h = {im["id"]: im["height"] for im in doc["images"]}
    degenerate = [a for a in doc["annotations"] if a["bbox"][2] <= 0 or a["bbox"][3] <= 0]
    outside = [
        a
        for a in doc["annotations"]
        if a["bbox"][2] > 0
        and a["bbox"][3] > 0
        and (
            a["bbox"][0] < 0
            or a["bbox"][1] < 0
            or a["bbox"][0] + a["bbox"][2] > w[a["image_id"]]
            or a["bbox"][1] + a["bbox"][3] > h[a["image_id"]]
        )
    ]
    empty = set(w) - {a["image_id"] for a in doc["annotations"]}
    return degenerate, outside, empty


def test_heads_imperfections(made):
    root, summary = made("heads")
    docs = {s: json.loads((root / s / "_annotations.coco.json").read_text()) for s in ("train", "valid", "test")}
    degenerate, outside, empty = _heads_stats(docs["train"])
    assert any(a["bbox"][2] == 0 for a in degenerate) and any(a["bbox"][3] == 0 for a in degenerate)
    assert any(a["bbox"][2] < 0 for a in degenerate)
    assert outside and empty
    assert summary["splits"]["train"]["degenerate_boxes"] == len(degenerate)
    assert summary["splits"]["train"]["boxes_partly_outside"] == len(outside)
    assert summary["splits"]["train"]["empty_images"] == len(empty)
    degenerate, outside, empty = _heads_stats(docs["valid"])
    assert empty and outside and not degenerate
    assert _heads_stats(docs["test"]) == ([], [], set())


def test_heads_boxes_are_tight_around_hair_capped_faces(made):
    root, _ = made("heads")
    doc = json.loads((root / "test" / "_annotations.coco.json").read_text())
    files = {im["id"]: im["file_name"] for im in doc["images"]}
    checked = ok = 0
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        if h < 16:
            continue
        img = np.asarray(Image.open(root / "test" / files[a["image_id"]]), np.float32)
        cx = int(x + w / 2)
        face = img[int(y + 0.62 * h), cx]
        cap = img[int(y + 0.06 * h) + 1, cx]
        above = img[max(int(y) - 2, 0), cx]
        checked += 1
        # face is skin (red-dominant, brighter than the hair cap); the cap lies inside the box top
        ok += int(face[0] > face[2] and face.sum() > cap.sum() + 40 and np.abs(cap - above).sum() > 20)
    assert checked >= 3 and ok >= 0.75 * checked


# ----------------------------------------------------------------------------- isic


def test_isic_layout_masks_and_signal(made):
    root, summary = made("isic")
    expected = {
        "ISIC2018_Task1-2_Training_Input",
        "ISIC2018_Task1_Training_GroundTruth",
        "ISIC2018_Task1-2_Validation_Input",
        "ISIC2018_Task1_Validation_GroundTruth",
        "ISIC2018_Task1-2_Test_Input",
        "ISIC2018_Task1_Test_GroundTruth",
    }
    assert {p.name for p in root.iterdir()} == expected
    ids, sizes, contrasts = [], [], []
    for split, count in (("Training", 2), ("Validation", 4), ("Test", 4)):
        inp = root / f"ISIC2018_Task1-2_{split}_Input"
        gt = root / f"ISIC2018_Task1_{split}_GroundTruth"
        assert (inp / "ATTRIBUTION.txt").is_file() and (inp / "LICENSE.txt").is_file()
        jpgs = sorted(inp.glob("*.jpg"))
        assert len(jpgs) == count and len(list(inp.iterdir())) == count + 2
        assert {p.name for p in gt.iterdir()} == {f"{p.stem}_segmentation.png" for p in jpgs}
        for jpg in jpgs:
            assert jpg.stem.startswith("ISIC_") and len(jpg.stem) == 12 and jpg.stem[5:].isdigit()
            ids.append(jpg.stem)
            img = Image.open(jpg)
            mask_img = Image.open(gt / f"{jpg.stem}_segmentation.png")
            assert img.mode == "RGB" and mask_img.mode == "L" and mask_img.format == "PNG"
            assert img.size == mask_img.size
            assert 48 <= img.size[0] <= 80 and 48 <= img.size[1] <= 80
            sizes.append(img.size)
            mask = np.asarray(mask_img)
            assert set(np.unique(mask)) == {0, 255}
            rgb = np.asarray(img, np.float32).mean(-1)
            contrasts.append(rgb[mask == 0].mean() - rgb[mask == 255].mean())
    assert len(set(ids)) == len(ids)  # unique across splits
    assert all(w != h for w, h in sizes) and len(set(sizes)) > 1
    assert min(contrasts) > 20  # the lesion is darker than the rest of the image
    assert sum(s["distractors"] for s in summary["splits"].values()) > 0  # context is needed


def test_isic_context_rule(made):
    """A lesion near the centre of every image; in the mask exactly when the far surround is dark."""
    root, summary = made("isic-context")
    surrounded = {"Training": 0, "Validation": 0, "Test": 0}
    for split in surrounded:
        inp, gt = root / f"ISIC2018_Task1-2_{split}_Input", root / f"ISIC2018_Task1_{split}_GroundTruth"
        for jpg in sorted(inp.glob("*.jpg")):
            rgb = np.asarray(Image.open(jpg), np.float32).mean(-1)
            mask = np.asarray(Image.open(gt / f"{jpg.stem}_segmentation.png"))
            assert rgb.shape == mask.shape == (64, 64)
            dark = rgb < 0.7 * np.median(rgb[20:44, 20:44])
            outside = dark.copy()
            outside[14:50, 14:50] = False  # the surround starts 25 pixels from the centre, the lesion within 10
            surround = outside.sum() > 50
            assert mask.any() == surround
            surrounded[split] += surround
            lesion = np.argwhere(dark[20:44, 20:44])  # the lesion blob, either way
            assert len(lesion) > 8 and np.abs(lesion.mean(0) + 20 - 32).max() < 5
    assert surrounded == {k: v["dark_surround"] for k, v in summary["splits"].items()}
    assert 0 < sum(surrounded.values()) < 16  # both kinds of image
    with pytest.raises(ValueError, match="size must be >= 64"):
        syn.make_isic_context(root.parent / "small", n=2, size=48)


# ----------------------------------------------------------------------------- fundus


def test_fundus_raw_drive_layout(made):
    root, summary = made("fundus")
    files = set(_tree(root))
    expected = set()
    for i in (21, 22):
        expected |= {
            f"training/images/{i}_training.tif",
            f"training/1st_manual/{i}_manual1.gif",
            f"training/mask/{i}_training_mask.gif",
        }
    for i in ("01", "02"):
        expected |= {
            f"test/images/{i}_test.tif",
            f"test/1st_manual/{i}_manual1.gif",
            f"test/mask/{i}_test_mask.gif",
            f"test/2nd_manual/{i}_manual2.gif",
        }
    assert files == expected
    for split, idx in (("training", "21"), ("test", "01")):
        img = Image.open(root / split / "images" / f"{idx}_{split}.tif")
        assert img.format == "TIFF" and img.mode == "RGB" and img.size == (48, 48)
        manual = Image.open(root / split / "1st_manual" / f"{idx}_manual1.gif")
        fov = Image.open(root / split / "mask" / f"{idx}_{split}_mask.gif")
        assert manual.format == fov.format == "GIF" and manual.mode in ("L", "P")
        vessels, fov = np.asarray(manual.convert("L")), np.asarray(fov.convert("L"))
        assert vessels.shape == fov.shape == (48, 48)
        assert set(np.unique(vessels)) == {0, 255} and set(np.unique(fov)) == {0, 255}
        assert not np.any((vessels > 0) & (fov == 0))  # vessels only inside the field of view
        green = np.asarray(img, np.float32)[..., 1]
        assert green[vessels > 0].mean() < green[(vessels == 0) & (fov > 0)].mean() - 10
    m1 = np.asarray(Image.open(root / "test/1st_manual/01_manual1.gif").convert("L"))
    m2 = np.asarray(Image.open(root / "test/2nd_manual/01_manual2.gif").convert("L"))
    assert not np.any((m2 > 0) & (m1 == 0))  # the second observer sees a subset
    assert summary["splits"]["test"]["second_observer"] == 2


def test_fundus_mmseg_layout_pairs_as_drive_dataset_does(made):
    root, summary = made("fundus", layout="mmseg")
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "images"]
    for mm, ids in (("training", ("21", "22")), ("validation", ("01", "02"))):
        imgs = sorted(p.name for p in (root / "images" / mm).iterdir())
        assert imgs == [f"{i}.png" for i in ids]
        anns = {p.name for p in (root / "annotations" / mm).iterdir()}
        for name in imgs:  # mmseg DRIVEDataset: img_suffix '.png', seg_map_suffix '_manual1.png'
            seg = f"{name[: -len('.png')]}_manual1.png"
            assert seg in anns
            lab_img = Image.open(root / "annotations" / mm / seg)
            assert lab_img.mode == "L"
            lab = np.asarray(lab_img)
            assert set(np.unique(lab)) == {0, 1}
            img = Image.open(root / "images" / mm / name)
            assert img.mode == "RGB" and img.size == lab_img.size == (48, 48)
        extra = anns - {f"{n[:-4]}_manual1.png" for n in imgs}
        assert extra == ({f"{i}_manual2.png" for i in ids} if mm == "validation" else set())
    assert set(summary["splits"]) == {"training", "validation"}


# ----------------------------------------------------------------------------- events


def test_events_rvt_layout_and_label_indexing(made):
    h5py = pytest.importorskip("h5py")
    root, summary = made("events")
    seqs = {split: sorted((root / split).iterdir()) for split in ("train", "val", "test")}
    assert sorted(p.name for p in root.iterdir()) == ["test", "train", "val"]
    assert all(len(v) == 1 for v in seqs.values())
    frames, (hh, ww) = 8, (32, 32)
    for (seq,) in seqs.values():
        ev = seq / "event_representations_v2" / "stacked_histogram_dt=50_nbins=10"
        assert sorted(p.name for p in ev.iterdir()) == [
            "event_representations_ds2_nearest.h5",
            "objframe_idx_2_repr_idx.npy",
            "timestamps_us.npy",
        ]
        assert sorted(p.name for p in (seq / "labels_v2").iterdir()) == ["labels.npz", "timestamps_us.npy"]
        with h5py.File(ev / "event_representations_ds2_nearest.h5", "r") as f:
            assert list(f.keys()) == ["data"]
            data = f["data"][:]
        assert data.dtype == np.uint8 and data.shape == (frames, 20, hh, ww)
        assert data.max() <= 10 and data.sum() > 0
        ts = np.load(ev / "timestamps_us.npy")
        assert ts.dtype == np.int64 and np.array_equal(ts, (np.arange(frames) + 1) * 50000)
        o2r = np.load(ev / "objframe_idx_2_repr_idx.npy")
        npz = np.load(seq / "labels_v2" / "labels.npz")
        assert sorted(npz.files) == ["labels", "objframe_idx_2_label_idx"]
        labels, o2l = npz["labels"], npz["objframe_idx_2_label_idx"]
        assert labels.dtype == np.dtype(
            [
                ("t", "<u8"),
                ("x", "<f4"),
                ("y", "<f4"),
                ("w", "<f4"),
                ("h", "<f4"),
                ("class_id", "u1"),
                ("class_confidence", "<f4"),
                ("track_id", "<u4"),
            ]
        )
        assert o2r.dtype == o2l.dtype == np.int64
        frame_ts = np.load(seq / "labels_v2" / "timestamps_us.npy")
        assert frame_ts.dtype == np.int64
        assert 0 < len(o2r) < frames and len(o2r) == len(o2l) == len(frame_ts)  # sparse labels
        assert np.all(np.diff(o2r) >= 2) and np.all(o2r % 2 == 1)  # every 2nd representation
        assert o2l[0] == 0 and np.all(np.diff(o2l) > 0) and o2l[-1] < len(labels)
        assert len(np.unique(labels["t"])) == len(o2l)  # what RVT's label factory asserts
        bounds = list(o2l) + [len(labels)]
        for k, r in enumerate(o2r):
            rows = labels[bounds[k] : bounds[k + 1]]
            assert np.all(rows["t"] == ts[r]) and frame_ts[k] == ts[r]
        # RVT-preprocessed labels: sensor pixels (2x the histogram), cropped to the sensor, sides >= 5
        sw, sh = summary["sensor_hw"][1], summary["sensor_hw"][0]
        assert (sh, sw) == (2 * hh, 2 * ww)
        assert np.all(labels["x"] >= 0) and np.all(labels["x"] + labels["w"] <= sw - 1 + 1e-4)
        assert np.all(labels["y"] >= 0) and np.all(labels["y"] + labels["h"] <= sh - 1 + 1e-4)
        assert np.all(labels["w"] >= 5) and np.all(labels["h"] >= 5)
        assert np.all(labels["class_id"] < 8) and np.all(labels["class_confidence"] == 1)


def test_events_are_on_the_labelled_objects(made):
    h5py = pytest.importorskip("h5py")
    root, summary = made("events")
    seq = next((root / "train").iterdir())
    ev = seq / "event_representations_v2" / "stacked_histogram_dt=50_nbins=10"
    with h5py.File(ev / "event_representations_ds2_nearest.h5", "r") as f:
        data = f["data"][:].astype(np.int64)
    o2r = np.load(ev / "objframe_idx_2_repr_idx.npy")
    npz = np.load(seq / "labels_v2" / "labels.npz")
    labels, bounds = npz["labels"], list(npz["objframe_idx_2_label_idx"]) + [len(npz["labels"])]
    inside = total = 0
    for k, r in enumerate(o2r):
        counts = data[r].sum(0)
        region = np.zeros(counts.shape, bool)
        for row in labels[bounds[k] : bounds[k + 1]]:  # halve to histogram pixels, pad for motion
            x0, y0 = int(row["x"] / 2) - 3, int(row["y"] / 2) - 3
            x1, y1 = int((row["x"] + row["w"]) / 2) + 4, int((row["y"] + row["h"]) / 2) + 4
            region[max(y0, 0) : y1, max(x0, 0) : x1] = True
        inside += counts[region].sum()
        total += counts.sum()
    assert total > 0 and inside / total > 0.6
    assert summary["splits"]["train"]["small_objects"] > 0
    assert summary["splits"]["train"]["hot_pixels"] > 0


# ----------------------------------------------------------------------------- coco


def test_coco2017_layout_and_annotations(made):
    from pycocotools.coco import COCO

    root, summary = made("coco")
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "train2017", "val2017"]
    assert sorted(p.name for p in (root / "annotations").iterdir()) == [
        "instances_train2017.json",
        "instances_val2017.json",
    ]
    train_ids = set()
    for split, count in (("train2017", 3), ("val2017", 3)):
        coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
        assert [(c["id"], c["name"]) for c in coco.loadCats(coco.getCatIds())] == [
            (1, "person"),
            (3, "car"),
            (18, "dog"),
        ]
        imgs = coco.loadImgs(coco.getImgIds())
        assert len(imgs) == count
        assert {im["file_name"] for im in imgs} == {p.name for p in (root / split).iterdir()}
        for im in imgs:
            assert im["file_name"] == f"{im['id']:012d}.jpg"
            assert Image.open(root / split / im["file_name"]).size == (im["width"], im["height"]) == (192, 192)
        ids = {im["id"] for im in imgs}
        assert not (ids & train_ids)
        train_ids |= ids
        anns = coco.loadAnns(coco.getAnnIds())
        assert any(not coco.getAnnIds(imgIds=[i]) for i in ids)  # an image without annotations
        crowd = [a for a in anns if a["iscrowd"] == 1]
        assert crowd and all(isinstance(a["segmentation"], dict) for a in crowd)
        areas = [a["area"] for a in anns if a["iscrowd"] == 0]
        assert min(areas) < 32**2 and any(32**2 <= a < 96**2 for a in areas) and max(areas) >= 96**2
        for a in anns:
            mask = coco.annToMask(a)
            assert abs(mask.sum() - a["area"]) <= 0.15 * a["area"] + 20
            ys, xs = np.nonzero(mask)
            x, y, w, h = a["bbox"]
            assert xs.min() >= x - 1.5 and xs.max() <= x + w + 1.5 and ys.min() >= y - 1.5 and ys.max() <= y + h + 1.5
            if not a["iscrowd"]:
                assert a["segmentation"] and all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
        stats = summary["splits"][split]
        assert stats["annotations"] == len(anns) and stats["crowd"] == len(crowd)
