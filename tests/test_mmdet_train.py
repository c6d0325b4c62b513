"""The mmdet YOLOX head-detection config through mmdet's stock tools/train.py and the project's."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from _helpers import REPO, run_cmd

CONFIG = REPO / "projects/YOLOX/configs/yolox_vim-tiny_heads.py"
TINY = [
    "model.backbone.depth=2",
    "model.backbone.embed_dim=32",
    "model.backbone.checkpoint=None",
    "model.neck.in_channels=[32]",
    "model.neck.out_channels=32",
    "model.bbox_head.in_channels=32",
    "model.bbox_head.feat_channels=32",
    "model.neck.norm_cfg.num_groups=8",
    "model.bbox_head.norm_cfg.num_groups=8",
    "train_dataloader.dataset.pipeline.2.scale=(64,64)",
    "val_dataloader.dataset.pipeline.1.scale=(64,64)",
    "test_dataloader.dataset.pipeline.1.scale=(64,64)",
    "train_dataloader.batch_size=4",
    "train_dataloader.num_workers=0",
    "val_dataloader.num_workers=0",
    "test_dataloader.num_workers=0",
    "train_cfg.max_epochs=1",
    "default_hooks.logger.interval=1",
    "param_scheduler.0.end=2",
    # after two steps no score passes the default 0.01 threshold and CocoMetric would have nothing
    "model.test_cfg.score_thr=0.0",
]


def stock_mmdet_train() -> Path:
    root = Path(importlib.util.find_spec("mmdet").submodule_search_locations[0])
    path = root / ".mim" / "tools" / "train.py"
    assert path.is_file(), path
    return path


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["stock", "project"])
def test_yolox_vim_trains_one_epoch(heads_data, tmp_path, tool):
    script = stock_mmdet_train() if tool == "stock" else REPO / "tools/train.py"
    run_cmd(
        [sys.executable, str(script), str(CONFIG), "--work-dir", str(tmp_path), "--cfg-options", *TINY],
        env={"RAT_DATASETS": str(heads_data)},
    )
    assert (tmp_path / "epoch_1.pth").is_file()
    scalars = next(tmp_path.glob("*/vis_data/scalars.json")).read_text().splitlines()
    records = [json.loads(s) for s in scalars]
    assert any("loss_cls" in r for r in records)
    assert any("coco/bbox_mAP_50" in r for r in records)  # validated on the valid split


def test_unknown_cfg_option_is_one_clear_error(heads_data):
    proc = run_cmd(
        [sys.executable, "tools/train.py", str(CONFIG), "--cfg-options", "default_hooks.checkpont.interval=2"],
        env={"RAT_DATASETS": str(heads_data)},
        check=False,
    )
    assert proc.returncode == 2
    assert "checkpont" in proc.stderr and "Did you mean checkpoint" in proc.stderr and "Traceback" not in proc.stderr
