"""Bad inputs of the data: each case breaks one thing of a good synthetic dataset (Roboflow heads,
COCO 2017, ISIC 2018, DRIVE fundus, RVT events) and asserts the error type, that the message names
the split and the file, and that no input file was changed."""

import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rat_plugins.data import validate
from rat_plugins.data.roboflow import FILTERED_NAME, ORIGINAL_NAME, check_roboflow_split, filter_roboflow_coco
from rat_plugins.data.validate import DataError, MissingDataError, UnreadableDataError
from rat_plugins.utils.config_keys import ConfigError

from _helpers import REPO, run_cmd

BASELINE = REPO / "projects/ViTDet/configs/OFAT/baseline_lr0.001_bs8_adamw_ep100.py"
YOLOX = REPO / "projects/YOLOX/configs/yolox_vim-tiny_heads.py"
SETR = REPO / "projects/SETR/configs/setr_vit-s16_mla_fundus.py"
RAT_ISIC = REPO / "projects/RAT/configs/rat_isic_single_256.py"
D2_LOGGER = "detectron2.rat_plugins.data"


# ----------------------------------------------------------------------------- data and helpers


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One good copy of every dataset; each test breaks its own copy (see ``data``)."""
    from rat_plugins.data.synthetic import make_coco, make_events, make_fundus, make_heads, make_isic

    root = tmp_path_factory.mktemp("pristine")
    make_heads(root / "coco", n=4, seed=0, size=64)
    make_coco(root / "coco2017", n=3, seed=0, size=192)
    make_isic(root / "isic2018", n=4, seed=0, size=(40, 56))
    make_fundus(root / "fundus" / "drive_mmseg", n=4, seed=0, size=40, layout="mmseg")
    make_events(root / "events" / "etram", n=2, seed=3, size=32, frames=12, label_every=2)
    return root


@pytest.fixture
def data(pristine, tmp_path, monkeypatch):
    """A fresh copy of the datasets as the dataset root, and a data-check cache of this test's own."""
    root = tmp_path / "datasets"
    shutil.copytree(pristine, root)
    monkeypatch.setenv("RAT_DATASETS", str(root))
    monkeypatch.setenv(validate.CACHE_VARIABLE, str(tmp_path / "data_checks"))
    monkeypatch.delenv(validate.CHECK_MODE_VARIABLE, raising=False)
    return root


@pytest.fixture
def clean_catalog():
    """detectron2 registrations made by a test are removed afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    before = set(DatasetCatalog.list())
    yield
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture
def mmdet_scope():
    from mmengine.registry import init_default_scope

    import rat_plugins.mm  # noqa: F401  (registers the datasets)

    init_default_scope("mmdet")


@contextmanager
def captured(name):
    """Records logged to logger ``name`` (whatever handlers the frameworks have set up)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    log = logging.getLogger(name)
    log.addHandler(handler)
    try:
        yield records
    finally:
        log.removeHandler(handler)


def warnings_of(records):
    return [r.getMessage() for r in records if r.levelno == logging.WARNING]


def images(split_dir, pattern="*.jpg"):
    return sorted(Path(split_dir).glob(pattern))


def truncate(path, keep=0.5):
    """Cut a file (the header survives: PIL still opens it)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def edit_json(path, change):
    doc = json.loads(Path(path).read_text())
    change(doc)
    Path(path).write_text(json.dumps(doc))
    return Path(path).read_bytes()


def add_second_class(split_dir, n=2):
    """A real second class ('helmet') on the first ``n`` boxes of a Roboflow split."""

    def change(doc):
        doc["categories"].append(dict(id=2, name="helmet", supercategory="heads"))
        for ann in doc["annotations"][:n]:
            ann["category_id"] = 2

    return edit_json(Path(split_dir) / ORIGINAL_NAME, change)


def load_lazy(path, *overrides):
    from detectron2.config import LazyConfig

    cfg = LazyConfig.load(str(path))
    return LazyConfig.apply_overrides(cfg, list(overrides))


# ----------------------------------------------------------------------------- Roboflow heads (detectron2)


def test_missing_test_image_fails_at_start_not_after_training(data, clean_catalog):
    from rat_plugins.detectron2.data import validate_lazy_config_data

    gone = images(data / "coco" / "test")[2]
    gone.unlink()
    original = (data / "coco" / "test" / ORIGINAL_NAME).read_bytes()
    with pytest.raises(MissingDataError) as err:
        validate_lazy_config_data(load_lazy(BASELINE))
    message = str(err.value)
    assert "head_detection_test" in message and gone.name in message and "restore it" in message
    assert (data / "coco" / "test" / ORIGINAL_NAME).read_bytes() == original


def test_good_data_passes_and_guards_every_mapper(data, clean_catalog):
    from rat_plugins.detectron2.data import head_detection_mapper, validate_lazy_config_data

    cfg = load_lazy(BASELINE)
    validate_lazy_config_data(cfg)
    for key in ("train", "test", "final_test"):
        assert cfg.dataloader[key].mapper._target_ is head_detection_mapper
        assert cfg.dataloader[key].mapper.split.startswith("head_detection_")


def test_missing_train_image_fails_at_registration(data, clean_catalog):
    from rat_plugins.detectron2.data import head_detection_dicts

    gone = images(data / "coco" / "train")[1]
    gone.unlink()
    with pytest.raises(MissingDataError, match=rf"head_detection_train: .*{gone.name}.* does not exist"):
        head_detection_dicts("head_detection_train")


def test_truncated_jpeg_is_named_when_checked(data):
    broken = images(data / "coco" / "valid")[0]
    truncate(broken)
    with pytest.raises(UnreadableDataError, match=rf"valid: .*{broken.name}.* truncated"):
        check_roboflow_split(data / "coco" / "valid", split="valid")


def test_truncated_jpeg_mid_run_names_file_and_split(data, clean_catalog):
    """Header intact, data cut after the start-up check: the loader (in a worker) names the file."""
    from detectron2.config import instantiate

    from rat_plugins.detectron2.data import validate_lazy_config_data

    cfg = load_lazy(BASELINE, "dataloader.image_size=64", "dataloader.final_test.num_workers=1")
    validate_lazy_config_data(cfg)
    broken = images(data / "coco" / "test")[1]
    truncate(broken)
    loader = instantiate(cfg.dataloader.final_test)
    with pytest.raises(UnreadableDataError) as err:
        for _ in loader:
            pass
    message = str(err.value)
    assert message.startswith(f"head_detection_test: image file '{broken}'") and "truncated" in message
    assert "Traceback" not in message and "worker" in message


def test_zero_byte_and_non_image_files_are_named(data):
    split = data / "coco" / "train"
    empty, text = images(split)[:2]
    empty.write_bytes(b"")
    text.write_text("this is not a JPEG\n")
    with pytest.raises(UnreadableDataError) as err:
        check_roboflow_split(split, split="train")
    message = str(err.value)
    assert "2 files" in message and empty.name in message and "is empty (0 bytes)" in message
    assert text.name in message and "is not an image file" in message


def test_image_of_other_size_than_annotated(data):
    split = data / "coco" / "test"
    first = images(split)[0]
    Image.open(first).resize((50, 40)).save(first, "JPEG")
    with pytest.raises(DataError, match=rf"test: image file '.*{first.name}'.* is 50x40 but the annotations say 64x64"):
        check_roboflow_split(split, split="test")


def test_dropped_boxes_are_counted_and_warned_with_ids(data):
    """Negative width and outside the image: dropped, counted and printed at WARNING with their ids."""
    src = data / "coco" / "test" / ORIGINAL_NAME

    def change(doc):
        doc["annotations"][0]["bbox"] = [5, 5, -4, 10]
        doc["annotations"][1]["bbox"] = [500, 500, 10, 10]

    original = edit_json(src, change)
    ids = [a["id"] for a in json.loads(original)["annotations"][:2]]
    with captured("rat_plugins.data.roboflow") as records:
        stats = filter_roboflow_coco(src)
    assert stats["dropped_degenerate"] == 1 and stats["dropped_outside"] == 1
    (warning,) = warnings_of(records)
    assert "2 of" in warning and str(src) in warning
    assert f"ids {ids[0]})" in warning and f"ids {ids[1]})" in warning
    assert src.read_bytes() == original  # the original is never edited


def test_dropped_boxes_reach_stderr_without_any_logging_set_up(data):
    script = "from rat_plugins.data.roboflow import check_roboflow_split; import sys; check_roboflow_split(sys.argv[1])"
    proc = run_cmd([sys.executable, "-c", script, str(data / "coco" / "train")])
    assert "train split: 3 of" in proc.stderr and "annotation ids" in proc.stderr


def test_dropped_boxes_reach_detectron2_run_log(data, tmp_path):
    script = (
        "import sys; from detectron2.utils.logger import setup_logger; setup_logger(sys.argv[2]); "
        "from rat_plugins.detectron2.data import register_head_detection; register_head_detection(sys.argv[1])"
    )
    run_cmd([sys.executable, "-c", script, str(data / "coco"), str(tmp_path / "log.txt")])
    log = (tmp_path / "log.txt").read_text()
    assert "head_detection_train: 3 of" in log and "zero or negative size (annotation ids" in log


def test_unknown_category_id(data):
    src = data / "coco" / "valid" / ORIGINAL_NAME
    original = edit_json(src, lambda doc: doc["annotations"][0].update(category_id=7))
    with pytest.raises(DataError, match=rf"valid: '{src}': annotation \d+ uses unknown category id 7"):
        check_roboflow_split(src.parent, split="valid")
    assert src.read_bytes() == original and not (src.parent / FILTERED_NAME).exists()


def test_second_class_refused_against_one_class_model_with_the_fix(data, clean_catalog):
    from rat_plugins.detectron2.data import validate_lazy_config_data

    originals = [add_second_class(data / "coco" / split) for split in ("train", "valid", "test")]
    with pytest.raises(DataError) as err:
        validate_lazy_config_data(load_lazy(BASELINE))
    message = str(err.value)
    assert "2 classes ['head', 'helmet']" in message and "model.roi_heads.num_classes is 1" in message
    assert "dataloader.classes=[head]" in message and "model.roi_heads.num_classes=2" in message
    for split, original in zip(("train", "valid", "test"), originals):
        assert (data / "coco" / split / ORIGINAL_NAME).read_bytes() == original


def test_classes_filter_trains_the_named_class_and_warns(data, clean_catalog):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from rat_plugins.detectron2.data import validate_lazy_config_data

    for split in ("train", "valid", "test"):
        add_second_class(data / "coco" / split)
    with captured(D2_LOGGER) as records:
        validate_lazy_config_data(load_lazy(BASELINE, "dataloader.classes=[head]"))
    assert MetadataCatalog.get("head_detection_train").thing_classes == ["head"]
    assert {a["category_id"] for d in DatasetCatalog.get("head_detection_train") for a in d["annotations"]} == {0}
    left_out = [w for w in warnings_of(records) if "left out by classes=['head']" in w]
    assert len(left_out) == 3 and all("['helmet']" in w and "background" in w for w in left_out)


def test_unknown_class_name_in_classes(data):
    with pytest.raises(DataError, match=r"classes=\['hat'\] names \['hat'\].*choose classes from those"):
        check_roboflow_split(data / "coco" / "train", classes=["hat"])


def test_empty_split(data):
    src = data / "coco" / "valid" / ORIGINAL_NAME
    original = edit_json(src, lambda doc: doc.update(images=[], annotations=[]))
    with pytest.raises(DataError, match=r"valid: the split is empty, no images listed in .*valid"):
        check_roboflow_split(src.parent, split="valid")
    assert src.read_bytes() == original


def test_annotation_file_not_json_or_without_coco_keys(data):
    src = data / "coco" / "train" / ORIGINAL_NAME
    src.write_text('{"images": [')
    with pytest.raises(DataError, match=rf"train: '{src}' is not valid JSON .*download it again"):
        check_roboflow_split(src.parent, split="train")
    src.write_text('{"images": [], "annotations": []}')
    with pytest.raises(DataError, match=r"missing keys \['categories'\]"):
        check_roboflow_split(src.parent, split="train")
    src.write_text('{"images": [{"id": 0, "file_name": "a.jpg"}], "annotations": [], "categories": []}')
    with pytest.raises(DataError, match=r"image 0 lacks \['width', 'height'\]"):
        check_roboflow_split(src.parent, split="train")


def test_annotation_on_unknown_image_id(data):
    src = data / "coco" / "train" / ORIGINAL_NAME
    original = edit_json(src, lambda doc: doc["annotations"][0].update(image_id=99))
    with pytest.raises(DataError, match=r"train: .*annotation \d+ refers to unknown image id 99"):
        check_roboflow_split(src.parent, split="train")
    assert src.read_bytes() == original


def test_filter_tool_prints_one_error_and_exits_2(data):
    src = data / "coco" / "valid" / ORIGINAL_NAME
    src.write_text("not json")
    proc = run_cmd([sys.executable, "tools/filter_roboflow_export.py", "--root", str(data / "coco")], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("error: ") == 1 and str(src) in proc.stderr


# ----------------------------------------------------------------------------- Roboflow heads (mmdet)


def _yolox(data, keep_classes=True):
    from mmengine.config import Config

    cfg = Config.fromfile(str(YOLOX))
    if not keep_classes:
        for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
            cfg[key].dataset.pop("metainfo")
    return cfg


def test_mmdet_second_class_without_metainfo_refused(data, mmdet_scope):
    from rat_plugins.mm.datasets import validate_config_datasets

    for split in ("train", "valid", "test"):
        add_second_class(data / "coco" / split)
    with pytest.raises(DataError) as err:
        validate_config_datasets(_yolox(data, keep_classes=False))
    message = str(err.value)
    assert message.startswith("train_dataloader.dataset: the data has 2 classes ['head', 'helmet']")
    assert "model.bbox_head.num_classes is 1" in message and "metainfo=dict(classes=" in message


def test_mmdet_missing_test_image_fails_at_start(data, mmdet_scope):
    from rat_plugins.mm.datasets import validate_config_datasets

    gone = images(data / "coco" / "test")[0]
    gone.unlink()
    with pytest.raises(MissingDataError, match=rf"test_dataloader.dataset: test split: .*{gone.name}.* does not exist"):
        validate_config_datasets(_yolox(data))


def test_mmdet_truncated_image_mid_run(data, mmdet_scope):
    from mmdet.registry import DATASETS

    split = data / "coco" / "valid"
    dataset = DATASETS.build(
        dict(
            type="RoboflowCocoDataset",
            data_root=str(data / "coco"),
            ann_file="valid/_annotations.coco.json",
            data_prefix=dict(img="valid/"),
            test_mode=True,
            pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True)],
        )
    )
    assert dataset[0]["img"].shape[:2] == (64, 64)
    broken = images(split)[0]
    truncate(broken, keep=0.6)
    with pytest.raises(UnreadableDataError, match=rf"^valid split: image file '.*{broken.name}' .*truncated"):
        dataset[[Path(dataset.get_data_info(i)["img_path"]).name for i in range(len(dataset))].index(broken.name)]


def test_mmdet_warnings_reach_the_run_log(data, tmp_path):
    script = (
        "import sys; from mmengine.logging import MMLogger; "
        "MMLogger.get_instance('run', log_file=sys.argv[2]); import rat_plugins.mm; "
        "from mmengine.registry import init_default_scope; init_default_scope('mmdet'); "
        "from mmdet.registry import DATASETS; DATASETS.build(dict(type='RoboflowCocoDataset', data_root=sys.argv[1], "
        "ann_file='train/_annotations.coco.json', data_prefix=dict(img='train/'), pipeline=[]))"
    )
    run_cmd([sys.executable, "-c", script, str(data / "coco"), str(tmp_path / "run.log")])
    log = (tmp_path / "run.log").read_text()
    assert "WARNING - train split: 3 of" in log and "annotation ids" in log


# ----------------------------------------------------------------------------- COCO 2017 (RAT)


def test_coco2017_missing_val_image_fails_at_registration(data, clean_catalog):
    from rat_plugins.detectron2.data import coco2017_dicts

    gone = images(data / "coco2017" / "val2017")[0]
    gone.unlink()
    with pytest.raises(MissingDataError, match=rf"coco2017_val: .*{gone.name}.* does not exist"):
        coco2017_dicts("coco2017_train")  # the training loader: every split is checked now


def test_coco2017_unknown_category_and_bad_box(data, clean_catalog):
    from rat_plugins.detectron2.data import register_coco2017

    ann = data / "coco2017" / "annotations" / "instances_train2017.json"
    original = edit_json(ann, lambda doc: doc["annotations"][0].update(category_id=99))
    with pytest.raises(DataError, match=r"coco2017_train: .*annotation \d+ uses unknown category id 99"):
        register_coco2017()
    assert ann.read_bytes() == original

    def widths(doc):
        doc["annotations"][0]["category_id"] = 1
        doc["annotations"][0]["bbox"][2] = -3.0

    edit_json(ann, widths)
    first_id = json.loads(ann.read_text())["annotations"][0]["id"]
    with captured(D2_LOGGER) as records:
        register_coco2017()
    (warning,) = [w for w in warnings_of(records) if "coco2017_train" in w]
    assert f"zero or negative size (annotation ids {first_id})" in warning


RAT_COCO = REPO / "projects/RAT/configs/coco/rat_fpn_3level_coco.py"
RAT_COCO_SMALL = [
    "dataloader.test.mapper.augmentations.0.short_edge_length=64",
    "dataloader.test.mapper.augmentations.0.max_size=64",
    "dataloader.test.num_workers=0",
]


def test_coco2017_classes_against_the_80_class_model(data, clean_catalog):
    from rat_plugins.detectron2.data import validate_lazy_config_data

    with pytest.raises(DataError) as err:
        validate_lazy_config_data(load_lazy(RAT_COCO))
    message = str(err.value)
    assert message.startswith("coco2017_train (dataloader.train): the data has 3 classes ['person', 'car', 'dog']")
    assert "model.roi_heads.num_classes is 80" in message and "Set model.roi_heads.num_classes=3" in message


def test_coco2017_truncated_image_mid_run_through_the_zoo_mapper(data, clean_catalog):
    """The RAT config uses detectron2's own DatasetMapper: the check wraps it in place."""
    from detectron2.config import instantiate

    from rat_plugins.detectron2.data import checked_mapper, validate_lazy_config_data

    cfg = load_lazy(RAT_COCO, "model.roi_heads.num_classes=3", *RAT_COCO_SMALL)
    validate_lazy_config_data(cfg)
    assert cfg.dataloader.test.mapper._target_ is checked_mapper
    assert cfg.dataloader.test.mapper.mapper_target == "detectron2.data.DatasetMapper"
    broken = images(data / "coco2017" / "val2017")[-1]
    truncate(broken)
    with pytest.raises(UnreadableDataError, match=rf"^coco2017_val: image file '{broken}' .*truncated"):
        for _ in instantiate(cfg.dataloader.test):
            pass


# ----------------------------------------------------------------------------- ISIC 2018 and DRIVE (mmseg)


def _isic(data, split="Training", **kwargs):
    import rat_plugins.mm  # noqa: F401
    from rat_plugins.mm.datasets import ISIC2018Dataset

    pipeline = [dict(type="LoadImageFromFile"), dict(type="mmseg.LoadAnnotations")]
    return ISIC2018Dataset(data_root=str(data / "isic2018"), split=split, pipeline=pipeline, **kwargs)


def _isic_pair(data, split="Validation", index=0):
    from rat_plugins.data.isic_layout import ISIC_FOLDERS

    img_dir, gt_dir = (data / "isic2018" / f for f in ISIC_FOLDERS[split])
    image = images(img_dir)[index]
    return image, gt_dir / f"{image.stem}_segmentation.png"


def test_isic_missing_mask(data):
    image, mask = _isic_pair(data)
    mask.unlink()
    with pytest.raises(MissingDataError, match=rf"ISIC 2018 Validation split.*{image.name}.*restore"):
        _isic(data, "Validation")


def test_isic_mask_of_other_size_is_an_error_not_a_stretch(data):
    image, mask = _isic_pair(data)
    Image.open(mask).resize((10, 12)).save(mask)
    with pytest.raises(DataError, match=rf"Validation split: mask file '.*{mask.name}' is 10x12 but its image"):
        _isic(data, "Validation")


def test_isic_mask_with_three_channels_or_unknown_values(data):
    _, mask = _isic_pair(data, "Test")
    gray = np.asarray(Image.open(mask))
    Image.fromarray(np.stack([gray] * 3, -1)).save(mask)
    with pytest.raises(DataError, match=rf"{mask.name}' has 3 channels"):
        _isic(data, "Test")
    odd = gray.copy()
    odd[0, 0] = 128  # an anti-aliased edge: no class
    Image.fromarray(odd).save(mask)
    _isic(data, "Test")  # the header check does not decode masks
    with pytest.raises(DataError, match=rf"{mask.name}' holds the values \[128\]"):
        _isic(data, "Test", data_check="full")


def test_isic_truncated_mask_mid_run(data):
    dataset = _isic(data, "Validation")
    _, mask = _isic_pair(data, "Validation", 1)
    truncate(mask)
    index = [Path(dataset.get_data_info(i)["seg_map_path"]).name for i in range(len(dataset))].index(mask.name)
    with pytest.raises(UnreadableDataError, match=rf"^ISIC 2018 Validation split: mask file '.*{mask.name}'"):
        dataset[index]


def test_check_config_checks_isic_data(data):
    """tools/check_config.py used to report ISIC data as fine without reading it."""
    from mmengine.config import Config

    import rat_plugins.mm  # noqa: F401
    from rat_plugins.experiments.config_check import check_data

    _, mask = _isic_pair(data, "Test")
    Image.open(mask).resize((8, 8)).save(mask)
    missing, lines = [], []
    check_data(Config.fromfile(str(RAT_ISIC)), missing, lines)
    assert len(missing) == 1 and missing[0].startswith("test data: test_dataloader.dataset: ISIC 2018 Test split")
    assert mask.name in missing[0] and "is 8x8 but its image" in missing[0]
    assert lines[0] == f"data train: ok, 4 images, 4 annotations under {data / 'isic2018'}"


def test_drive_truncated_image_fails_at_start(data):
    from mmengine.config import Config

    import rat_plugins.mm  # noqa: F401
    from rat_plugins.mm.datasets import validate_config_datasets

    broken = data / "fundus" / "drive_mmseg" / "images" / "validation" / "01.png"
    truncate(broken)
    with pytest.raises(UnreadableDataError) as err:
        validate_config_datasets(Config.fromfile(str(SETR)))
    message = str(err.value)
    assert message.startswith("val_dataloader.dataset (DRIVEDataset") and str(broken) in message


def test_drive_mask_of_other_size(data):
    from mmengine.config import Config

    import rat_plugins.mm  # noqa: F401
    from rat_plugins.mm.datasets import validate_config_datasets

    mask = data / "fundus" / "drive_mmseg" / "annotations" / "training" / "21_manual1.png"
    Image.open(mask).resize((20, 20)).save(mask)
    with pytest.raises(DataError, match=rf"train_dataloader.dataset \(DRIVEDataset.*{mask.name}' is 20x20"):
        validate_config_datasets(Config.fromfile(str(SETR)))


# ----------------------------------------------------------------------------- RVT events


CLASSES = tuple(f"kind{i}" for i in range(8))


def _sequence(data, split="val"):
    root = data / "events" / "etram"
    return root, sorted(p for p in (root / split).iterdir() if p.is_dir())[0]


def test_rvt_class_id_out_of_range(data):
    from rat_plugins.data.rvt_events import RVTEventClips

    root, _ = _sequence(data)
    with pytest.raises(DataError, match=r"RVT train split: '.*labels\.npz' has class id \d+ but class_names has 3"):
        RVTEventClips(root, "train", CLASSES[:3])


def test_rvt_missing_or_corrupt_h5(data):
    from rat_plugins.data.rvt_events import REPR_FILE_DS2, RVTEventClips
    from rat_plugins.data.synthetic import EVENT_REPR_NAME

    root, seq = _sequence(data)
    h5 = seq / "event_representations_v2" / EVENT_REPR_NAME / REPR_FILE_DS2
    saved = h5.read_bytes()
    h5.unlink()
    with pytest.raises(MissingDataError, match=rf"RVT val split: '{h5}' does not exist"):
        RVTEventClips(root, "val", CLASSES)
    h5.write_bytes(saved[: len(saved) // 3])
    with pytest.raises(UnreadableDataError, match=rf"RVT val split: cannot open the HDF5 file '{h5}'.*truncated"):
        RVTEventClips(root, "val", CLASSES)


def test_rvt_h5_damaged_inside(data):
    """Header and shape intact, one compressed chunk zeroed: the full check finds it at start, a
    sample reading it names the file and the split."""
    import h5py

    from rat_plugins.data.rvt_events import REPR_FILE_DS2, RVTEventClips
    from rat_plugins.data.synthetic import EVENT_REPR_NAME

    root, seq = _sequence(data)
    h5 = seq / "event_representations_v2" / EVENT_REPR_NAME / REPR_FILE_DS2
    with h5py.File(h5, "r") as f:
        chunk = f["data"].id.get_chunk_info(3)
    damaged = bytearray(h5.read_bytes())
    damaged[chunk.byte_offset : chunk.byte_offset + chunk.size // 2] = bytes(chunk.size // 2)
    h5.write_bytes(bytes(damaged))
    clips = RVTEventClips(root, "val", CLASSES)  # the header check opens it and reads the shape
    with pytest.raises(UnreadableDataError, match=rf"^RVT val split: cannot read representations .* of '{h5}'"):
        for i in range(len(clips)):
            clips[i]
    with pytest.raises(UnreadableDataError, match=rf"^RVT val split: cannot read representations 0..11 of '{h5}'"):
        RVTEventClips(root, "val", CLASSES, check="full")


def test_rvt_unusable_boxes_dropped_with_a_warning(data):
    from rat_plugins.data.rvt_events import RVTEventClips

    root, seq = _sequence(data, "train")
    path = seq / "labels_v2" / "labels.npz"
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["labels"]["w"][0] = 0.0
    np.savez(path, **arrays)
    with captured("rat_plugins.data.rvt_events") as records:
        clips = RVTEventClips(root, "train", CLASSES)
    (warning,) = warnings_of(records)
    assert warning.startswith("RVT train split: 1 of") and f"{seq.name} labels.npz row 0" in warning
    assert all(np.all(clips.sample_info(i)["bboxes"][:, 2] > clips.sample_info(i)["bboxes"][:, 0]) for i in range(3))


def test_rvt_empty_split(data):
    from rat_plugins.data.rvt_events import RVTEventClips

    root = data / "events" / "etram"
    for seq in (root / "test").iterdir():
        shutil.rmtree(seq)
    with pytest.raises(MissingDataError, match=r"RVT test split: .*holds no sequence folders; the split is empty"):
        RVTEventClips(root, "test", CLASSES)


# ----------------------------------------------------------------------------- the check's cache and options


def test_cache_skips_unchanged_data_and_an_mtime_change_invalidates(data):
    split = data / "coco" / "test"
    entries = [validate.ImageEntry(str(p)) for p in images(split)]
    assert validate.check_image_files(entries, "test")["cached"] is False
    assert validate.check_image_files(entries, "test")["cached"] is True
    target = images(split)[0]
    good = target.read_bytes()
    # same size, new content and a new modification time: checked again, and the damage is found
    target.write_bytes(good[:100] + b"\x00" * (len(good) - 100))
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(UnreadableDataError, match=target.name):
        validate.check_image_files(entries, "test")
    target.write_bytes(good)
    assert validate.check_image_files(entries, "test")["cached"] is False
    options = validate.check_image_files(entries, "test", mode="full")
    assert options["cached"] is False and options["mode"] == "full"  # other options: checked anew


def test_damaged_or_unwritable_cache_never_fails_a_check(data, tmp_path, monkeypatch):
    entries = [validate.ImageEntry(str(p)) for p in images(data / "coco" / "valid")]
    validate.check_image_files(entries, "valid")
    for entry in (tmp_path / "data_checks").glob("*.json"):
        entry.write_text("{damaged")
    assert validate.check_image_files(entries, "valid")["cached"] is False
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv(validate.CACHE_VARIABLE, str(blocker / "cache"))
    with captured("rat_plugins.data.validate") as records:
        assert validate.check_image_files(entries, "valid")["cached"] is False
    assert any("could not be cached" in w for w in warnings_of(records))


def test_unknown_check_mode(data, monkeypatch):
    monkeypatch.setenv(validate.CHECK_MODE_VARIABLE, "thorough")
    with pytest.raises(ConfigError, match=r"\$RAT_DATA_CHECK is 'thorough'; choose one of header, full"):
        check_roboflow_split(data / "coco" / "test")


def test_mmdet_without_metainfo_takes_the_export_classes(data, mmdet_scope):
    """CocoDataset's default classes are COCO's 80: none matched the export, so no box was used."""
    from mmdet.registry import DATASETS

    dataset = DATASETS.build(
        dict(
            type="RoboflowCocoDataset",
            data_root=str(data / "coco"),
            ann_file="test/_annotations.coco.json",
            data_prefix=dict(img="test/"),
            test_mode=True,
            pipeline=[],
        )
    )
    assert dataset.metainfo["classes"] == ("head",)
    assert sum(len(dataset.get_data_info(i)["instances"]) for i in range(len(dataset))) == 13
