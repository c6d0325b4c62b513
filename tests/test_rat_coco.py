"""RAT + FPN Faster R-CNN on COCO 2017 (projects/RAT/configs/coco): the config builds with the
strides FPN needs, trains and evaluates under the project's and detectron2's stock tool (tiny
sizes, synthetic COCO), and a missing dataset is one clear error."""

import json
import sys

import pytest

from _helpers import REPO, detectron2_stock_tool as stock_tool, run_cmd

CONFIG = REPO / "projects/RAT/configs/coco/rat_fpn_3level_coco.py"
# 64x64 images (the synthetic set is 192x192), a 16-wide RAT with 2 heads and 1 grouping
# iteration, few proposals and RoIs: seconds per run on one CPU core.
TINY = [
    "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
    "dataloader.train.mapper.augmentations.0.max_size=64",
    "dataloader.test.mapper.augmentations.0.short_edge_length=64",
    "dataloader.test.mapper.augmentations.0.max_size=64",
    "model.backbone.bottom_up.feature_dims=16",
    "model.backbone.bottom_up.num_heads=2",
    "model.backbone.bottom_up.iters=1",
    "model.roi_heads.num_classes=3",  # person, car, dog
    "model.roi_heads.batch_size_per_image=16",
    "model.proposal_generator.pre_nms_topk=[64,64]",
    "model.proposal_generator.post_nms_topk=[32,32]",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "train.device=cpu",
    "train.log_period=1",
    "train.max_iter=2",
    "train.eval_period=2",
    "train.checkpointer.period=2",
]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    from rat_plugins.data.synthetic import make_coco

    root = tmp_path_factory.mktemp("datasets")
    make_coco(root / "coco2017", n=6, seed=0, size=192)  # 6 train, 3 val images
    return root


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]


def test_config_builds_fpn_over_all_three_levels(coco_root, monkeypatch):
    import torch
    from detectron2.config import LazyConfig, instantiate

    monkeypatch.setenv("RAT_DATASETS", str(coco_root))
    cfg = LazyConfig.load(str(CONFIG))
    assert cfg.model.roi_heads.num_classes == 80 and cfg.dataloader.evaluator.dataset_name == "coco2017_val"
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 0.05
    bb = cfg.model.backbone.bottom_up
    assert (bb.attention, bb.num_blocks, bb.feature_dims, tuple(bb.scales)) == ("local", 3, 128, (1.0, 0.5, 0.25))
    cfg.model.backbone.bottom_up.update(feature_dims=16, num_heads=2, iters=1)
    backbone = instantiate(cfg.model).backbone
    shapes = backbone.bottom_up.output_shape()
    assert {name: s.stride for name, s in shapes.items()} == {
        "level0_block1": 4,
        "level1_block1": 8,
        "level2_block1": 16,
        "level2_block2": 32,
    }
    assert backbone.size_divisibility == backbone.bottom_up.size_divisibility == 32
    assert {name: s.stride for name, s in backbone.output_shape().items()} == {
        "p2": 4,
        "p3": 8,
        "p4": 16,
        "p5": 32,
        "p6": 64,
    }
    with torch.no_grad():
        out = backbone.eval()(torch.randn(1, 3, 64, 96))
    assert {name: tuple(x.shape[2:]) for name, x in out.items()} == {
        "p2": (16, 24),
        "p3": (8, 12),
        "p4": (4, 6),
        "p5": (2, 3),
        "p6": (1, 2),
    }


@pytest.mark.slow
def test_trains_and_evaluates_under_project_tool(coco_root, tmp_path):
    out = tmp_path / "run"
    run_cmd(
        [
            sys.executable,
            "tools/lazyconfig_train_net.py",
            "--config-file",
            str(CONFIG),
            *TINY,
            f"train.output_dir={out}",
        ],
        env={"RAT_DATASETS": str(coco_root)},
    )
    metrics = _metrics(out)
    losses = [m for m in metrics if "total_loss" in m]
    assert [m["iteration"] for m in losses] == [0, 1]
    assert all(k in losses[0] for k in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"))
    evaluated = [m for m in metrics if "bbox/AP" in m]
    assert evaluated  # values may be NaN or 0 after 2 iterations: the keys are the point
    assert all(f"bbox/{k}" in evaluated[-1] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    assert (out / "model_final.pth").is_file()


@pytest.mark.slow
def test_trains_under_stock_detectron2_tool(coco_root, tmp_path):
    out = tmp_path / "stock"
    run_cmd(
        [sys.executable, str(stock_tool()), "--config-file", str(CONFIG), *TINY, f"train.output_dir={out}"],
        env={"RAT_DATASETS": str(coco_root)},
    )
    assert [m["iteration"] for m in _metrics(out) if "total_loss" in m] == [0, 1]
    assert (out / "model_final.pth").is_file()


def test_missing_dataset_is_one_clear_error(tmp_path):
    proc = run_cmd(
        [sys.executable, "tools/lazyconfig_train_net.py", "--config-file", str(CONFIG)],
        env={"RAT_DATASETS": str(tmp_path)},
        check=False,
    )
    assert proc.returncode != 0
    assert f"{tmp_path}/coco2017" in proc.stderr
    assert "python -m rat_plugins.data.synthetic coco --out" in proc.stderr and "datasets/README.md" in proc.stderr
    assert "Traceback" not in proc.stderr
