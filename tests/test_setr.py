"""SETR-MLA on mmseg: configs, the frozen encoder, timm weights, training through the stock and project tools."""

import glob
import importlib.util
import json
import os
import socket
import sys

import pytest
import torch

import rat_plugins.mm  # noqa: F401  (registers FrozenVisionTransformer, VesselMetric)
from rat_plugins.mm.setr import FrozenVisionTransformer

from _helpers import REPO, run_cmd

CONFIG_DIR = REPO / "projects" / "SETR" / "configs"
FROZEN = CONFIG_DIR / "setr_vit-b16_mla_frozen_fundus.py"
SMALL = CONFIG_DIR / "setr_vit-s16_mla_fundus.py"
EXPERIMENTS = sorted(p for p in CONFIG_DIR.glob("*.py"))
STOCK_TRAIN = os.path.join(importlib.util.find_spec("mmseg").submodule_search_locations[0], ".mim", "tools", "train.py")
EMBED, LAYERS, SIZE = 64, 4, 32

# A tiny version of the configs, as --cfg-options: 4-layer ViT 64 wide on 32x32 crops, 4 iterations.
TINY = {
    "model.backbone.embed_dims": EMBED,
    "model.backbone.num_layers": LAYERS,
    "model.backbone.num_heads": 2,
    "model.backbone.out_indices": (0, 1, 2, 3),
    "model.backbone.img_size": (SIZE, SIZE),
    "model.neck.in_channels": [EMBED] * 4,
    "model.neck.out_channels": 16,
    "model.decode_head.in_channels": (16, 16, 16, 16),
    "model.decode_head.channels": 32,
    "model.decode_head.mla_channels": 8,
    "model.data_preprocessor.size": (SIZE, SIZE),
    "train_dataloader.dataset.pipeline.2.scale": (SIZE, SIZE),
    "train_dataloader.dataset.pipeline.3.crop_size": (SIZE, SIZE),
    "val_dataloader.dataset.pipeline.1.scale": (SIZE, SIZE),
    "test_dataloader.dataset.pipeline.1.scale": (SIZE, SIZE),
    "train_dataloader.batch_size": 2,
    "train_dataloader.num_workers": 0,
    "train_dataloader.persistent_workers": False,
    "val_dataloader.num_workers": 0,
    "val_dataloader.persistent_workers": False,
    "test_dataloader.num_workers": 0,
    "test_dataloader.persistent_workers": False,
    "train_cfg.max_iters": 4,
    "train_cfg.val_interval": 4,
    "param_scheduler.0.end": 4,
    "default_hooks.checkpoint.interval": 2,
    "default_hooks.logger.interval": 1,
    "randomness.seed": 0,
}


def _fmt(v):
    if isinstance(v, tuple):
        return "(" + ",".join(map(_fmt, v)) + ")"
    if isinstance(v, list):
        return "[" + ",".join(map(_fmt, v)) + "]"
    return str(v)


def cfg_options(**extra):
    opts = dict(TINY)
    opts.update({k.replace("__", "."): v for k, v in extra.items()})
    return ["--cfg-options"] + [f"{k}={_fmt(v)}" for k, v in opts.items()]


def tiny_timm_file(path, embed=EMBED, layers=LAYERS, grid=14, seed=0):
    """A timm-layout ViT checkpoint ({'model': ..., 'args': ...} as DeiT / MAE save), 14x14 grid as at 224."""
    import argparse

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.05 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {
        "cls_token": r(1, 1, embed),
        "pos_embed": r(1, grid * grid + 1, embed),
        "patch_embed.proj.weight": r(embed, 3, 16, 16),
        "patch_embed.proj.bias": r(embed),
        "norm.weight": 1 + r(embed),
        "norm.bias": r(embed),
        "mask_token": r(1, 1, embed),
        "decoder_embed.weight": r(16, embed),
    }
    for i in range(layers):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": 1 + r(embed),
                p + "norm1.bias": r(embed),
                p + "attn.qkv.weight": r(3 * embed, embed),
                p + "attn.qkv.bias": r(3 * embed),
                p + "attn.proj.weight": r(embed, embed),
                p + "attn.proj.bias": r(embed),
                p + "norm2.weight": 1 + r(embed),
                p + "norm2.bias": r(embed),
                p + "mlp.fc1.weight": r(4 * embed, embed),
                p + "mlp.fc1.bias": r(4 * embed),
                p + "mlp.fc2.weight": r(embed, 4 * embed),
                p + "mlp.fc2.bias": r(embed),
            }
        )
    torch.save({"model": sd, "epoch": 1, "args": argparse.Namespace(model="vit_tiny")}, path)
    return sd


def tiny_backbone(**kw):
    args = dict(
        img_size=(SIZE, SIZE),
        patch_size=16,
        embed_dims=EMBED,
        num_layers=LAYERS,
        num_heads=2,
        out_indices=(0, 1, 2, 3),
        qkv_bias=True,
        patch_bias=True,
        final_norm=True,
        norm_cfg=dict(type="LN", eps=1e-6),
    )
    args.update(kw)
    return FrozenVisionTransformer(**args)


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "VFM_tiny.pth"
    return path, tiny_timm_file(path)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- configs and model


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_config_builds_and_runs_forward(config):
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    cfg = Config.fromfile(str(config))
    assert cfg.default_scope == "mmseg" and cfg.custom_imports.imports == ["rat_plugins.mm"]
    assert cfg.custom_imports.allow_failed_imports is False
    assert cfg.optim_wrapper.optimizer.type == "AdamW" and cfg.optim_wrapper.optimizer.lr == 1e-4
    assert cfg.param_scheduler[0].type == "CosineAnnealingLR"
    assert cfg.default_hooks.checkpoint.save_best == "Dice" and cfg.default_hooks.checkpoint.save_last
    assert {b.type for b in cfg.vis_backends} >= {"TensorboardVisBackend"}
    assert cfg.val_evaluator.type == "VesselMetric"
    bb = cfg.model.backbone
    assert cfg.model.decode_head.up_scale * 4 == bb.patch_size  # stride-4 head, derived from the patch
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(cfg.model)
    if not bb.pretrained_timm:  # the frozen config's weights file is not here
        model.init_weights()
    n_bb = sum(p.numel() for p in model.backbone.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if config == FROZEN:
        assert (bb.embed_dims, bb.num_layers, bb.num_heads, bb.mlp_ratio * bb.embed_dims) == (768, 12, 12, 3072)
        assert bb.pretrained_timm == "VFM_Fundus_weights.pth" and bb.frozen
        assert 85e6 < n_bb < 87e6 and not any(p.requires_grad for p in model.backbone.parameters())
        assert trainable == sum(p.numel() for p in model.parameters()) - n_bb
    else:
        assert not bb.frozen and bb.pretrained_timm is None
        assert trainable == sum(p.numel() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 224, 224), mode="tensor")
    assert out.shape == (1, 2, 56, 56)


def test_frozen_encoder_stays_frozen():
    bb = tiny_backbone(frozen=True)
    bb.init_weights()
    assert not any(p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not any(m.training for m in bb.modules())
    x = torch.randn(2, 3, SIZE, SIZE, requires_grad=True)
    outs = bb(x)
    assert len(outs) == 4 and outs[0].shape == (2, EMBED, 2, 2)
    assert all(not o.requires_grad and o.grad_fn is None for o in outs)  # no graph through the encoder

    free = tiny_backbone(frozen=False)
    free.train()
    assert free.training and all(p.requires_grad for p in free.parameters())
    sum(o.sum() for o in free(x)).backward()
    assert free.patch_embed.projection.weight.grad is not None


def test_pretrained_timm_loading(tmp_path, timm_file, caplog):
    from rat_plugins.models.vit_convert import convert_timm_vit_to_mmseg

    with pytest.raises(FileNotFoundError) as e:
        tiny_backbone(pretrained_timm=str(tmp_path / "nope.pth")).init_weights()
    assert "nope.pth" in str(e.value) and "config field model.backbone.pretrained_timm" in str(e.value)

    path, sd = timm_file
    bb = tiny_backbone(pretrained_timm=str(path))
    bb.init_weights()
    ref, _ = convert_timm_vit_to_mmseg(sd, num_layers=LAYERS, embed_dims=EMBED, grid_hw=(2, 2))
    for k, v in bb.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert bb.pos_embed.shape == (1, 1 + 4, EMBED)  # 14x14 table resized to the 2x2 grid of 32x32

    with pytest.raises(ValueError, match=r"checkpoint is embed 64, 4 layers.*model is embed 96, 4 layers"):
        tiny_backbone(embed_dims=96, pretrained_timm=str(path)).init_weights()
    with pytest.raises(ValueError, match="patch_bias=True"):
        tiny_backbone(patch_bias=False, pretrained_timm=str(path)).init_weights()


def test_frozen_parameters_get_no_update_and_no_optimizer_state(timm_file):
    """Under the config's optimizer: encoder bit-identical after steps, decoder changed."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    cfg = Config.fromfile(str(FROZEN))
    cfg.merge_from_dict({k: v for k, v in TINY.items() if k.startswith("model.")})
    cfg.model.backbone.pretrained_timm = str(timm_file[0])
    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    for _ in range(3):
        samples = []
        for _ in range(2):
            s = SegDataSample()
            s.gt_sem_seg = PixelData(data=torch.randint(0, 2, (1, SIZE, SIZE)))
            s.set_metainfo(dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE)))
            samples.append(s)
        data = dict(
            inputs=[torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8) for _ in range(2)], data_samples=samples
        )
        model.train_step(data, optim)
    after = model.state_dict()
    enc = [k for k in after if k.startswith("backbone.")]
    dec = [k for k in after if k.startswith(("neck.", "decode_head.")) and after[k].is_floating_point()]
    assert enc and all(torch.equal(before[k], after[k]) for k in enc)
    assert sum(not torch.equal(before[k], after[k]) for k in dec) > len(dec) // 2
    # mmengine's default constructor hands every parameter to AdamW; frozen ones never get a
    # gradient, so AdamW skips them: no update, no weight decay, no optimizer state.
    state_ids = {id(p) for p in optim.optimizer.state}
    assert not state_ids & {id(p) for p in model.backbone.parameters()}
    assert state_ids == {id(p) for p in model.parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- tools


def _only_ckpt_backbone(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt, {k[len("backbone.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.")}


@pytest.mark.slow
def test_stock_mmseg_train_tool_frozen_config(tmp_path, fundus_data, timm_file):
    """mmseg's own tools/train.py runs the frozen config; encoder bit-identical, decoder trained, logs."""
    from rat_plugins.models.vit_convert import convert_timm_vit_to_mmseg

    work = tmp_path / "work"
    run_cmd(
        [
            sys.executable,
            STOCK_TRAIN,
            str(FROZEN),
            "--work-dir",
            str(work),
            *cfg_options(model__backbone__pretrained_timm=str(timm_file[0])),
        ],
        env={"RAT_DATASETS": str(fundus_data)},
        timeout=600,
    )
    assert (work / "iter_2.pth").is_file() and (work / "iter_4.pth").is_file()
    assert glob.glob(str(work / "best_Dice_iter_4.pth"))
    ref, _ = convert_timm_vit_to_mmseg(timm_file[1], num_layers=LAYERS, embed_dims=EMBED, grid_hw=(2, 2))
    c2, bb2 = _only_ckpt_backbone(work / "iter_2.pth")
    c4, bb4 = _only_ckpt_backbone(work / "iter_4.pth")
    assert sorted(bb4) == sorted(ref) and all(torch.equal(bb2[k], ref[k]) and torch.equal(bb4[k], ref[k]) for k in ref)
    dec = [k for k in c4["state_dict"] if k.startswith(("neck.", "decode_head.")) and "num_batches" not in k]
    assert sum(not torch.equal(c2["state_dict"][k], c4["state_dict"][k]) for k in dec) > len(dec) // 2
    assert c4["meta"]["iter"] == 4
    # text log: the weight report; vis_data: the scalars that also went to TensorBoard
    log = open(glob.glob(str(work / "*" / "*.log"))[0]).read()
    assert "FrozenVisionTransformer" in log and "ignored 2 non-encoder keys" in log
    assert "pos_embed interpolated (bicubic, cls slot kept) from a 14x14 to a 2x2 patch grid" in log
    vis = glob.glob(str(work / "*" / "vis_data"))[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(glob.glob(os.path.join(vis, "events.out.tfevents.*"))[0])
    events.Reload()
    assert {"loss", "lr", "Dice", "IoU", "Accuracy", "Sensitivity", "Specificity"} <= set(events.Tags()["scalars"])
    records = [json.loads(line) for line in open(os.path.join(vis, "scalars.json"))]
    train_keys = set().union(*(r for r in records if "loss" in r))
    val = [r for r in records if "Dice" in r]
    assert {"loss", "lr"} <= train_keys
    assert val and {"Dice", "IoU", "Accuracy", "Sensitivity", "Specificity", "mIoU", "mDice"} <= set(val[-1])


@pytest.mark.slow
def test_dist_train_two_cpu_processes(tmp_path, fundus_data):
    work = tmp_path / "work"
    proc = run_cmd(
        [
            "bash",
            str(REPO / "tools/dist_train.sh"),
            str(SMALL),
            "2",
            "--work-dir",
            str(work),
            *cfg_options(train_cfg__max_iters=2, train_cfg__val_interval=2),
        ],
        env={"RAT_DATASETS": str(fundus_data), "PORT": str(_free_port())},
        timeout=600,
    )
    log = open(glob.glob(str(work / "*" / "*.log"))[0]).read()
    assert "Distributed training: True" in log and "backend='gloo'" in log
    assert "Iter(train) [2/2]" in log + proc.stdout
    assert (work / "iter_2.pth").is_file()


def test_check_config_reports_what_is_missing(tmp_path, fundus_data, timm_file):
    tool = str(REPO / "tools/check_config.py")
    proc = run_cmd(
        [
            sys.executable,
            tool,
            str(FROZEN),
            *cfg_options(model__backbone__pretrained_timm=str(tmp_path / "absent.pth")),
        ],
        env={"RAT_DATASETS": str(tmp_path / "nothing")},
        check=False,
    )
    missing = [ln for ln in proc.stdout.splitlines() if ln.startswith("MISSING:")]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any("absent.pth" in ln and "model.backbone.pretrained_timm" in ln for ln in missing)
    assert sum("data:" in ln for ln in missing) == 4  # {train, val (= test)} x {images, annotations}
    assert "forward: input 1x3x32x32 -> logits 1x2x8x8 (decode head stride 4)" in proc.stdout

    proc = run_cmd(
        [sys.executable, tool, str(FROZEN), *cfg_options(model__backbone__pretrained_timm=str(timm_file[0]))],
        env={"RAT_DATASETS": str(fundus_data)},
    )
    assert "result: ok" in proc.stdout and "MISSING" not in proc.stdout
    n_bb = sum(p.numel() for p in tiny_backbone().parameters())
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("parameters:"))
    assert f"({n_bb})" in line.split("frozen")[1]
    assert "data train: ok, 4 images, 4 annotations" in proc.stdout


def test_mmengine_checkpoints_load_weights_only_with_a_narrow_allow_list(tmp_path):
    """rat_plugins.mm.checkpoint: HistoryBuffer (as in mmengine's message_hub) loads; other getattr does not."""
    import pickle

    from mmengine.logging import HistoryBuffer

    from rat_plugins.mm.checkpoint import history_buffer_getattr

    buf = HistoryBuffer()
    buf.update(0.5)
    buf.update(0.25)
    torch.save({"message_hub": {"log_scalars": {"train/loss": buf}}, "meta": {"iter": 2}}, tmp_path / "c.pth")
    loaded = torch.load(tmp_path / "c.pth")  # torch's default: weights_only=True
    assert loaded["message_hub"]["log_scalars"]["train/loss"].mean() == pytest.approx(0.375)
    assert history_buffer_getattr(HistoryBuffer, "mean") is HistoryBuffer.mean
    for obj, name in ((HistoryBuffer, "__init__"), (os, "system"), (torch, "load")):
        with pytest.raises(pickle.UnpicklingError, match="refuses getattr"):
            history_buffer_getattr(obj, name)


def test_frozen_encoder_features_cached_per_view(timm_file, tmp_path):
    """With feature_cache_dir the frozen encoder's four MLA layers come from disk on a repeat view."""
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    def build(**backbone):
        cfg = Config.fromfile(str(FROZEN))
        cfg.merge_from_dict({k: v for k, v in TINY.items() if k.startswith("model.")})
        cfg.model.backbone.pretrained_timm = str(timm_file[0])
        cfg.model.backbone.update(backbone)
        with DefaultScope.overwrite_default_scope("mmseg"):
            model = MODELS.build(cfg.model)
        model.init_weights()
        return model.eval()

    plain = build()
    cached = build(feature_cache_dir=str(tmp_path))
    assert set(cached.state_dict()) == set(plain.state_dict())
    x = torch.randn(2, 3, SIZE, SIZE)
    first = cached.backbone(x)
    again = cached.backbone(x)
    reference = plain.backbone(x)
    assert len(first) == 4 and cached.backbone._cached_forward.cache.hits == 2
    for a, b, ref in zip(first, again, reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, ref, rtol=1e-3, atol=2e-3)  # float16 storage
    with pytest.raises(ValueError, match="feature_cache_dir needs frozen=True"):
        build(frozen=False, feature_cache_dir=str(tmp_path))
