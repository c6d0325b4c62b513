"""RAT on ISIC 2018: the dataset on make_isic files, layout errors, every config in projects/RAT/configs
(main + ablations) trained 2 iterations in process, one through mmseg's stock tools/train.py."""

import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import rat_plugins.mm  # noqa: F401  (registers ISIC2018Dataset, LesionMetric, RAT)
from rat_plugins.data.isic_layout import ISIC_FOLDERS
from rat_plugins.experiments.rat_study import quick_overrides
from rat_plugins.mm.datasets import ISIC2018Dataset
from rat_plugins.mm.rat import RAT
from rat_plugins.models.rat_ablations import StandardMHAGrouping

from _helpers import REPO, run_cmd

CONFIG_DIR = REPO / "projects" / "RAT" / "configs"
MAIN = sorted(CONFIG_DIR.glob("*.py"))
ABLATIONS = sorted((CONFIG_DIR / "ablations").glob("*.py"))
ALL = MAIN + ABLATIONS
TRIPLE = CONFIG_DIR / "rat_isic_triple_256-128-64.py"
STOCK_TRAIN = os.path.join(importlib.util.find_spec("mmseg").submodule_search_locations[0], ".mim", "tools", "train.py")
SIZE = 64


def _load(config):
    from mmengine.config import Config

    return Config.fromfile(str(config))


def tiny(cfg, work_dir, iters=2):
    """64x64 images, 2 heads, 1 grouping iteration, widths / 8 (the dims ablations keep their ratio),
    no validation; keeps each config's own factor (scales, depth, attention, positional encoding)."""
    return quick_overrides(
        cfg,
        work_dir,
        size=SIZE,
        iters=iters,
        width_factor=0.125,
        num_heads=2,
        grouping_iters=1,
        batch_size=2,
        val_interval=1000,
    )


def sorted_by_stride(backbone_cfg):
    """The map indices of a RAT config, finest stride first (ties: finer level first)."""
    levels, blocks = len(backbone_cfg.scales), backbone_cfg.num_blocks
    return tuple(sorted(range(levels * blocks), key=lambda i: (i // blocks + i % blocks, i // blocks)))


# ----------------------------------------------------------------------------- dataset


def test_dataset_loads_make_isic_files(isic_data):
    pipeline = [dict(type="LoadImageFromFile"), dict(type="mmseg.LoadAnnotations")]
    root = isic_data / "isic2018"
    ds = ISIC2018Dataset(data_root=str(root), split="Training", pipeline=pipeline)
    names = sorted(p.stem for p in (root / ISIC_FOLDERS["Training"][0]).glob("*.jpg"))
    assert len(ds) == 4 == len(names)  # ATTRIBUTION.txt / LICENSE.txt are not samples
    assert [os.path.basename(ds.get_data_info(i)["img_path"])[:-4] for i in range(4)] == names
    assert ds.metainfo["classes"] == ("background", "lesion") and ds.metainfo["label_map"] == {0: 0, 255: 1}
    lesion = 0
    for i in range(len(ds)):
        sample = ds[i]
        raw = np.array(__import__("PIL.Image").Image.open(ds.get_data_info(i)["seg_map_path"]))
        assert set(np.unique(raw)) <= {0, 255}
        gt = sample["gt_seg_map"]
        assert gt.shape == raw.shape == sample["img"].shape[:2]
        assert np.array_equal(gt, (raw == 255).astype(gt.dtype))  # 255 -> 1, 0 -> 0
        lesion += int(gt.sum())
    assert lesion > 0
    assert len(ISIC2018Dataset(data_root=str(root), split="Validation", pipeline=pipeline)) == 4
    assert len(ISIC2018Dataset(data_root=str(root), split="Test", pipeline=pipeline)) == 4


def test_bad_layouts_give_clear_errors(isic_data, tmp_path):
    root = tmp_path / "isic2018"
    shutil.copytree(isic_data / "isic2018", root)
    img_dir, gt_dir = (root / f for f in ISIC_FOLDERS["Training"])
    with pytest.raises(ValueError, match="split must be one of"):
        ISIC2018Dataset(data_root=str(root), split="train")
    with pytest.raises(FileNotFoundError, match=r"image folder .*ISIC2018_Task1-2_Training_Input.* does not exist"):
        ISIC2018Dataset(data_root=str(tmp_path / "nowhere"), split="Training")

    first = sorted(img_dir.glob("*.jpg"))[0].stem
    mask = gt_dir / f"{first}_segmentation.png"
    mask.rename(tmp_path / mask.name)
    with pytest.raises(FileNotFoundError, match=rf"1 image\(s\) in .* without a mask .*: {first}\.jpg"):
        ISIC2018Dataset(data_root=str(root), split="Training")
    (tmp_path / mask.name).rename(mask)
    shutil.copy(mask, gt_dir / "ISIC_9999999_segmentation.png")
    with pytest.raises(FileNotFoundError, match=r"1 mask\(s\) .* without an image .*ISIC_9999999_segmentation\.png"):
        ISIC2018Dataset(data_root=str(root), split="Training")
    (gt_dir / "ISIC_9999999_segmentation.png").unlink()
    assert len(ISIC2018Dataset(data_root=str(root), split="Training")) == 4  # repaired

    shutil.rmtree(gt_dir)
    with pytest.raises(FileNotFoundError, match=r"mask folder .*ISIC2018_Task1_Training_GroundTruth.* does not exist"):
        ISIC2018Dataset(data_root=str(root), split="Training")
    for p in img_dir.glob("*.jpg"):
        p.unlink()
    gt_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.jpg image"):
        ISIC2018Dataset(data_root=str(root), split="Training")


# ----------------------------------------------------------------------------- configs


EXPECTED_DELTA = {  # ablation -> the backbone fields it changes w.r.t. the triple-scale base
    "pe_rose_learnable": {},
    "pe_none": {"rotary_ratio": 0.0},
    "pe_rope_fixed": {"learnable_rose": False, "learnable_rose_scaling": False, "rose_initial_scaling": "identity"},
    "pe_absolute": {"pos_embed": "absolute", "abs_ref_size": 256, "rotary_ratio": 0.0},
    "attn_dense": {"attention": "dense"},
    "attn_sparse": {"attention": "sparse"},
    "attn_mixed": {},
    "attn_mha": {"attention": "mha"},
    "depth_2": {"num_blocks": 2},
    "depth_4": {},
    "depth_6": {"num_blocks": 6},
    "dims_128": {},
    "dims_256": {"feature_dims": 256},
}


def test_config_set_and_ablation_deltas():
    from mmseg.registry import MODELS

    assert [p.name for p in MAIN] == [
        "rat_isic_dual_256-128.py",
        "rat_isic_single_256.py",
        "rat_isic_triple_256-128-64.py",
    ]
    assert sorted(p.stem for p in ABLATIONS) == sorted(EXPECTED_DELTA)
    base = _load(TRIPLE)
    for config in ALL:
        cfg = _load(config)
        bb, head = cfg.model.backbone, cfg.model.decode_head
        assert cfg.custom_imports.imports == ["rat_plugins.mm"] and cfg.default_scope == "mmseg"
        assert cfg.val_evaluator.type == "LesionMetric" and cfg.train_dataloader.dataset.type == "ISIC2018Dataset"
        assert cfg.default_hooks.checkpoint.save_best == "Dice"
        # every map, by stride, and the head takes them all with the right widths
        assert bb.type == "RAT" and bb.out_features == "by_stride", config.name
        out_indices = MODELS.build(bb).out_indices
        assert tuple(out_indices) == sorted_by_stride(bb), config.name
        assert tuple(head.in_index) == tuple(range(len(out_indices)))
        assert list(head.in_channels) == [bb.feature_dims] * len(out_indices), config.name
        if config in ABLATIONS:
            delta = {k: v for k, v in bb.items() if base.model.backbone.get(k, "<absent>") != v}
            assert delta == EXPECTED_DELTA[config.stem], config.name
            other = {k: v for k, v in cfg.model.items() if k not in ("backbone", "decode_head")}
            assert other == {k: v for k, v in base.model.items() if k not in ("backbone", "decode_head")}
    assert [
        _load(CONFIG_DIR / f"rat_isic_{n}.py").model.backbone.scales
        for n in ("single_256", "dual_256-128", "triple_256-128-64")
    ] == [(1.0,), (1.0, 0.5), (1.0, 0.5, 0.25)]


@pytest.mark.parametrize("config", ALL, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_config_trains_two_iterations(config, isic_data, tmp_path, monkeypatch):
    from rat_plugins.mm.runner import build_runner

    monkeypatch.setenv("RAT_DATASETS", str(isic_data))
    cfg = tiny(_load(config), tmp_path / "work")
    runner = build_runner(cfg)
    before = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
    runner.train()
    model = runner.model
    net = model.backbone.net
    # the config's factor reached the model
    want = _load(config).model.backbone
    assert net.num_blocks == want.num_blocks and net.num_levels == len(want.scales)
    assert net.feature_dims == want.feature_dims // 8
    if want.get("attention") == "mha":
        assert all(isinstance(layer, StandardMHAGrouping) for layer in net.sga_layers)
    elif want.attention in ("dense", "sparse"):
        kind = "local" if want.attention == "sparse" else "dense"
        assert net.attention_kinds == (kind,) * net.num_blocks
    if want.get("pos_embed") == "absolute":
        assert isinstance(model.backbone, RAT) and type(net.init_proj).__name__ == "AbsolutePositionConv"
    if want.get("rotary_ratio") == 0.0:
        assert all(m.rotary_dim == 0 for n, m in net.named_modules() if n.endswith("rose"))
    if want.get("learnable_rose") is False:
        assert not any("freqs" in n or "scale_" in n for n, _ in net.named_parameters())
    assert runner.iter == 2
    after = model.state_dict()
    changed = [k for k in after if after[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("decode_head.") for k in changed)
    metrics = runner.val_loop.run()
    assert {"Dice", "IoU", "Sensitivity", "Specificity", "mIoU"} <= set(metrics)
    assert all(0 <= metrics[k] <= 100 for k in ("Dice", "IoU", "Sensitivity", "Specificity"))


def test_ablation_layers_keep_the_package_weights():
    from mmseg.registry import MODELS

    kw = dict(feature_dims=16, num_heads=2, num_blocks=2, iters=1, scales=(1.0, 0.5))
    torch.manual_seed(0)
    plain = RAT(attention="dense", **kw)
    torch.manual_seed(0)
    mha = RAT(attention="mha", **kw)
    assert plain.state_dict().keys() == mha.state_dict().keys()
    assert all(torch.equal(v, mha.state_dict()[k]) for k, v in plain.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    a, b = plain(x), mha(x)
    assert [t.shape for t in a] == [t.shape for t in b] and not torch.allclose(a[0], b[0])
    # standard attention by hand on one grouping layer: softmax over keys, no renormalisation over queries
    layer = mha.net.sga_layers[0]
    tokens = torch.randn(1, 64, 16)
    out = layer(tokens, (1.0, 1.0), (8, 8))["x_out"]
    q_in = layer.norm1(layer.strider(tokens.transpose(1, 2).reshape(1, 16, 8, 8)).flatten(2).transpose(1, 2))
    k, v = layer.kv(tokens).chunk(2, dim=-1)
    k = layer.temp * layer.rose(k, (1.0, 1.0), (8, 8), flatten=False).transpose(1, 2)
    q = layer.rose(layer.q(q_in), (2.0, 2.0), (4, 4), flatten=False).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    ref = q_in + layer.norm2((w @ v.reshape(*k.shape)).reshape(1, 16, 16))
    ref = ref + layer.norm3(layer.mlp(ref))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="rotary_ratio=0.0"):
        RAT(pos_embed="absolute", **kw)
    # older configs name the ablation backbone RATAblation: the same class
    absolute = MODELS.build(dict(type="RATAblation", pos_embed="absolute", rotary_ratio=0.0, **kw))
    assert type(absolute) is RAT
    img = torch.zeros(1, 3, 32, 32)
    proj = absolute.net.init_proj
    pe = proj(img) - torch.nn.functional.conv2d(img, proj.weight, proj.bias, padding=proj.padding)
    assert pe.abs().max() > 0.5 and not torch.allclose(pe[..., 0, 0], pe[..., 5, 7])
    # pyramid levels share one frame: channel 0 is sin(row centre / rows * 256) at every level
    pe16 = proj(torch.zeros(1, 3, 16, 16)) - proj.bias[None, :, None, None]
    for level, n in ((pe, 32), (pe16, 16)):
        want = torch.sin((torch.arange(n) + 0.5) / n * 256).expand(n, n).T
        torch.testing.assert_close(level[0, 0].detach(), want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- stock tool


@pytest.mark.slow
def test_stock_mmseg_train_tool_single_config(isic_data, tmp_path):
    work = tmp_path / "work"
    opts = {
        "model.backbone.feature_dims": 16,
        "model.backbone.num_heads": 2,
        "model.backbone.iters": 1,
        "model.decode_head.in_channels": "[16,16,16,16]",
        "model.decode_head.channels": 16,
        "model.decode_head.pool_scales": "(1,2)",
        "model.data_preprocessor.size": f"({SIZE},{SIZE})",
        "train_dataloader.dataset.pipeline.2.scale": f"({SIZE},{SIZE})",
        "val_dataloader.dataset.pipeline.1.scale": f"({SIZE},{SIZE})",
        "test_dataloader.dataset.pipeline.1.scale": f"({SIZE},{SIZE})",
        "train_dataloader.batch_size": 2,
        "train_dataloader.num_workers": 0,
        "train_dataloader.persistent_workers": False,
        "val_dataloader.num_workers": 0,
        "val_dataloader.persistent_workers": False,
        "test_dataloader.num_workers": 0,
        "test_dataloader.persistent_workers": False,
        "train_cfg.max_iters": 2,
        "train_cfg.val_interval": 2,
        "param_scheduler.0.end": 2,
        "default_hooks.checkpoint.interval": 2,
        "default_hooks.logger.interval": 1,
        "randomness.seed": 0,
    }
    proc = run_cmd(
        [
            sys.executable,
            STOCK_TRAIN,
            str(CONFIG_DIR / "rat_isic_single_256.py"),
            "--work-dir",
            str(work),
            "--cfg-options",
            *[f"{k}={v}" for k, v in opts.items()],
        ],
        env={"RAT_DATASETS": str(isic_data)},
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert "Iter(train) [2/2]" in out
    assert "lesion (dataset): Dice" in out and "Specificity" in out
    assert (work / "iter_2.pth").is_file()
    ckpt = torch.load(work / "iter_2.pth", map_location="cpu", weights_only=False)
    assert ckpt["meta"]["iter"] == 2 and any(k.startswith("backbone.net.sga_layers.") for k in ckpt["state_dict"])
