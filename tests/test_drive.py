"""Raw DRIVE -> mmseg layout (rat_plugins.data.drive, tools/convert_drive.py), on files made here."""

import json
import shutil
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from rat_plugins.data.drive import DriveLayoutError, convert_drive
from rat_plugins.data.synthetic import make_fundus

from _helpers import REPO, run_cmd


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _arr(path):
    with Image.open(path) as im:
        return np.asarray(im)


def _gif(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr.astype(np.uint8), "P")
    img.putpalette([v for i in range(256) for v in (i, i, i)])
    img.save(path, format="GIF")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("drive") / "DRIVE"
    make_fundus(root, n=2, seed=3, size=(40, 36), layout="raw")
    return root


def test_matches_mmseg_layout_of_the_same_sample(raw, tmp_path):
    summary = convert_drive(raw, tmp_path / "mm")
    make_fundus(tmp_path / "ref", n=2, seed=3, size=(40, 36), layout="mmseg")
    assert _files(tmp_path / "mm") == _files(tmp_path / "ref")
    assert "images/training/21.png" in _files(tmp_path / "mm")
    assert "annotations/validation/01_manual1.png" in _files(tmp_path / "mm")
    for rel in _files(tmp_path / "ref"):
        assert np.array_equal(_arr(tmp_path / "mm" / rel), _arr(tmp_path / "ref" / rel)), rel
    labels = _arr(tmp_path / "mm" / "annotations/training/21_manual1.png")
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 1}
    assert summary["splits"]["training"]["images"] == 2 and summary["splits"]["test"]["second_observer"] == 2
    assert not [f for f in _files(tmp_path / "mm") if ".tmp" in f]  # atomic writes leave nothing behind


def _tiny_raw(root):
    """One training image 5x4 with annotation values 0/100/200/255 and a field-of-view mask."""
    img = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4
    (root / "training/images").mkdir(parents=True)
    Image.fromarray(img, "RGB").save(root / "training/images/21_training.tif")
    manual = np.array([[0, 100, 200, 255, 0]] * 4)
    _gif(root / "training/1st_manual/21_manual1.gif", manual)
    fov = np.full((4, 5), 255)
    fov[0, :] = 0
    _gif(root / "training/mask/21_training_mask.gif", fov)
    return img


def test_threshold_and_field_of_view(tmp_path):
    img = _tiny_raw(tmp_path / "raw")
    convert_drive(tmp_path / "raw", tmp_path / "a")
    assert np.array_equal(_arr(tmp_path / "a/images/training/21.png"), img)
    expect = np.array([[0, 0, 1, 1, 0]] * 4, np.uint8)  # >= 128 is vessel, as mmseg's converter
    assert np.array_equal(_arr(tmp_path / "a/annotations/training/21_manual1.png"), expect)
    convert_drive(tmp_path / "raw", tmp_path / "b", fov_ignore=True)
    expect[0, :] = 255  # outside the field of view: mmseg's ignore_index
    assert np.array_equal(_arr(tmp_path / "b/annotations/training/21_manual1.png"), expect)


def test_missing_or_mismatched_annotation_writes_nothing(raw, tmp_path):
    broken = tmp_path / "raw"
    shutil.copytree(raw, broken)
    (broken / "training/1st_manual/22_manual1.gif").unlink()
    _gif(broken / "test/1st_manual/01_manual1.gif", np.zeros((7, 7)))
    with pytest.raises(DriveLayoutError) as e:
        convert_drive(broken, tmp_path / "out")
    assert "22_manual1.gif: annotation missing" in str(e.value)
    with pytest.raises(DriveLayoutError, match=r"01_manual1.gif: size 7x7 != image 40x36"):
        shutil.copy(raw / "training/1st_manual/22_manual1.gif", broken / "training/1st_manual/22_manual1.gif")
        convert_drive(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_not_drive_and_overwrite(raw, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DriveLayoutError, match="not a raw DRIVE folder"):
        convert_drive(tmp_path / "empty", tmp_path / "out")
    out = tmp_path / "out"
    convert_drive(raw, out)
    (out / "README.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_drive(raw, out)
    (out / "images/training/99.png").write_bytes(b"stale")
    convert_drive(raw, out, overwrite=True)
    assert (out / "README.txt").read_text() == "keep me"
    assert not (out / "images/training/99.png").exists()


def test_zip_archives(raw, tmp_path):
    for split in ("training", "test"):  # the two archives of the DRIVE download
        with zipfile.ZipFile(tmp_path / f"{split}.zip", "w") as zf:
            for p in (raw / split).rglob("*"):
                if p.is_file():
                    zf.write(p, p.relative_to(raw))
    convert_drive([tmp_path / "training.zip", tmp_path / "test.zip"], tmp_path / "z")
    convert_drive(raw, tmp_path / "f")
    assert _files(tmp_path / "z") == _files(tmp_path / "f")


def test_cli(raw, tmp_path):
    proc = run_cmd([sys.executable, str(REPO / "tools/convert_drive.py"), str(raw), "--out", str(tmp_path / "o")])
    summary = json.loads(proc.stdout)
    assert summary["splits"]["training"]["annotations"] == 2
    proc = run_cmd(
        [sys.executable, str(REPO / "tools/convert_drive.py"), str(tmp_path / "o"), "--out", str(tmp_path / "p")],
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
