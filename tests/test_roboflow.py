import json

import pytest

from rat_plugins.data.roboflow import FILTERED_NAME, ORIGINAL_NAME, filter_roboflow_coco


def _export(tmp_path, annotations, images=None):
    images = images or [
        dict(id=0, file_name="a.jpg", width=100, height=80),
        dict(id=1, file_name="b.jpg", width=100, height=80),
    ]
    data = dict(
        info={},
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[dict(id=0, name="heads", supercategory="none"), dict(id=1, name="head", supercategory="heads")],
    )
    path = tmp_path / ORIGINAL_NAME
    path.write_text(json.dumps(data))
    return path


def _ann(i, bbox, image_id=0):
    return dict(id=i, image_id=image_id, category_id=1, bbox=bbox, area=bbox[2] * bbox[3], iscrowd=0, segmentation=[])


def test_filter_drops_supercategory_and_invalid_boxes(tmp_path):
    src = _export(
        tmp_path,
        [
            _ann(1, [10, 10, 20, 20]),
            _ann(2, [5, 5, 0, 10]),
            _ann(3, [90, 70, 30, 30]),
            _ann(4, [200, 200, 10, 10]),
            _ann(5, [1, 1, -3, 4]),
        ],
    )
    before = src.read_bytes()
    stats = filter_roboflow_coco(src)
    assert src.read_bytes() == before  # the original is never edited
    out = json.loads((tmp_path / FILTERED_NAME).read_text())
    assert out["categories"] == [dict(id=1, name="head", supercategory="none")]
    assert [a["id"] for a in out["annotations"]] == [1, 3]
    assert out["annotations"][1]["bbox"] == [90.0, 70.0, 10.0, 10.0]  # clipped to the image
    assert stats["dropped_degenerate"] == 2 and stats["dropped_outside"] == 1 and stats["clipped"] == 1
    assert stats["images_without_boxes"] == 1 and stats["boxes"] == 2


def test_filter_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="synthetic heads"):
        filter_roboflow_coco(tmp_path / "missing" / ORIGINAL_NAME)
    bad = tmp_path / ORIGINAL_NAME
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        filter_roboflow_coco(bad)
    src = _export(tmp_path, [_ann(1, [1, 1, 5, 5], image_id=7)])
    with pytest.raises(ValueError, match="unknown image id 7"):
        filter_roboflow_coco(src)
    assert not (tmp_path / FILTERED_NAME).exists()  # nothing half-written


def test_filter_refuses_to_overwrite_original(tmp_path):
    src = _export(tmp_path, [_ann(1, [1, 1, 5, 5])])
    with pytest.raises(ValueError, match="refusing"):
        filter_roboflow_coco(src, src)


def _unregister(*names):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_registration_follows_the_dataset_folder(tmp_path):
    """The same folder twice is a no-op; another folder under the same name replaces it."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from rat_plugins.data.synthetic import make_heads
    from rat_plugins.detectron2.data import register_head_detection

    first, second = tmp_path / "a" / "coco", tmp_path / "b" / "coco"
    make_heads(first, n=4, seed=0, size=64)
    make_heads(second, n=8, seed=1, size=64)
    try:
        assert set(register_head_detection(first, name="reg_test")) == {"train", "valid", "test"}
        assert register_head_detection(first, name="reg_test") == {}  # nothing redone
        assert set(register_head_detection(second, name="reg_test")) == {"train", "valid", "test"}
        meta = MetadataCatalog.get("reg_test_train")
        assert meta.image_root == str(second / "train") and meta.num_images == 8
        assert len(DatasetCatalog.get("reg_test_train")) == 8
    finally:
        _unregister(*(f"reg_test_{split}" for split in ("train", "valid", "test")))


def test_head_detection_names_and_the_earlier_ones(tmp_path):
    """head_detection_<split>, and the earlier heads_<split> / register_custom_coco still resolve."""
    from detectron2.data import DatasetCatalog

    from rat_plugins.data.synthetic import make_heads
    from rat_plugins.detectron2 import data

    root = tmp_path / "coco"
    make_heads(root, n=4, seed=0, size=64)
    names = [f"{prefix}_{split}" for prefix in ("head_detection", "heads") for split in ("train", "valid", "test")]
    _unregister(*names)
    assert data.register_custom_coco is data.register_head_detection
    assert data.head_detection_num_images("train", root) == 4
    assert not (root / "train" / FILTERED_NAME).exists()  # counting writes nothing
    try:
        dicts = data.head_detection_dicts("head_detection_train", root=root, filter_empty=False)
        assert len(dicts) == 4 and (root / "train" / FILTERED_NAME).is_file()
        assert len(DatasetCatalog.get("heads_train")) == 4
        assert all(name in DatasetCatalog.list() for name in names)
    finally:
        _unregister(*names)


def test_classes_choose_and_order_the_kept_classes(tmp_path):
    """classes= keeps the named classes with ids in its order; the other real class is left out."""
    src = _export(tmp_path, [_ann(1, [10, 10, 20, 20]), dict(_ann(2, [30, 30, 10, 10]), category_id=2)])
    doc = json.loads(src.read_text())
    doc["categories"].append(dict(id=2, name="helmet", supercategory="heads"))
    src.write_text(json.dumps(doc))
    both = filter_roboflow_coco(src, classes=["helmet", "head"])
    out = json.loads((tmp_path / FILTERED_NAME).read_text())
    assert both["categories"] == ["helmet", "head"] and both["left_out"] == {}
    assert [(c["id"], c["name"]) for c in out["categories"]] == [(1, "helmet"), (2, "head")]
    assert {a["id"]: a["category_id"] for a in out["annotations"]} == {1: 2, 2: 1}
    one = filter_roboflow_coco(src, classes=["head"])
    assert one["categories"] == ["head"] and one["left_out"] == {"helmet": 1} and one["boxes"] == 1
    assert filter_roboflow_coco(src)["categories"] == ["head", "helmet"]  # default: every real class
