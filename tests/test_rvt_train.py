"""RVT on mmdet: the recurrent YOLOX detector, the event-clip preprocessor, and both RVT configs
training a few iterations on synthetic RVT-layout events under mmdet's stock tools/train.py and the
project's."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from _helpers import REPO, recurrent_yolox_cfg, run_cmd

torch.set_num_threads(1)

CONFIGS = REPO / "projects/RVT/configs"
BASELINE = CONFIGS / "maxvit_yolox_patch4_3scale_baseline.py"
PATCH2 = CONFIGS / "patch2_4scale_sizeaware_200k.py"


@pytest.fixture
def mmdet_scope():  # per test: conftest clears the default scope after every test
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    import rat_plugins.mm  # noqa: F401  (registers RecurrentYOLOX, EventClipDataPreprocessor)

    with DefaultScope.overwrite_default_scope("mmdet"):  # what default_scope='mmdet' in a config does
        yield MODELS


def _tiny_detector(MODELS, patch_size=2, partition_split=1, out_indices=(0, 1, 2, 3), preprocessor=None):
    cfg = recurrent_yolox_cfg(
        patch_size=patch_size,
        out_indices=out_indices,
        backbone=dict(partition_split=partition_split),
        data_preprocessor=preprocessor or dict(type="EventClipDataPreprocessor"),
        train_cfg=dict(assigner=dict(type="SimOTAAssigner", center_radius=2.5)),
    )
    torch.manual_seed(0)
    return MODELS.build(cfg).eval()


def _sample(valid, is_first):
    from mmdet.structures import DetDataSample

    sample = DetDataSample()
    sample.set_metainfo(dict(valid=torch.tensor(valid), is_first=torch.tensor(is_first)))
    return sample


# (valid, is_first, the steps the state must come from: a fresh state at the first of them)
CLIP_CASES = [
    ([False, False, True, True], [False, False, True, False], [2, 3]),  # short clip, front-padded
    ([True, True, True, True], [True, False, False, False], [0, 1, 2, 3]),  # full clip from a sequence start
    ([True, True, True, True], [False, False, True, False], [2, 3]),  # a new sequence starts mid-clip
    ([False, True, True, True], [False, False, False, False], [1, 2, 3]),  # padding with no reset flag
]


def test_clip_forward_equals_step_by_step_backbone(mmdet_scope):
    det = _tiny_detector(mmdet_scope)
    net = det.backbone.net
    torch.manual_seed(1)
    # padded steps hold events too: a model that let them into the state would differ
    clip = torch.rand(len(CLIP_CASES), 4, 20, 32, 32) * 5
    samples = [_sample(v, f) for v, f, _ in CLIP_CASES]
    with torch.no_grad():
        neck_out = det.extract_feat(clip, samples)
        expected = []
        for b, (_, _, steps) in enumerate(CLIP_CASES):
            states = None
            for t in steps:
                feats, states = net(clip[b : b + 1, t], states)
            expected.append(feats)
        assert det.backbone.out_features == ("stage1", "stage2", "stage3", "stage4")
        want = tuple(torch.cat([e[name] for e in expected]) for name in det.backbone.out_features)
        assert [w.shape[-1] for w in want] == [16, 8, 4, 2]
        valid = torch.tensor([c[0] for c in CLIP_CASES])
        is_first = torch.tensor([c[1] for c in CLIP_CASES])
        got = det.backbone.forward_clip(clip, valid=valid, is_first=is_first)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()
        for g, w in zip(neck_out, det.neck(want)):
            assert torch.allclose(g, w, atol=1e-5)
        # ignoring the masks (every step valid from step 0) gives other features: the test can see them
        plain = det.extract_feat(clip)
        assert not torch.allclose(plain[0][0], neck_out[0][0], atol=1e-3)
        assert torch.allclose(plain[0][1], neck_out[0][1], atol=1e-5)  # case 1 is a plain clip


def test_detector_runs_loss_and_predict_on_packed_clips(mmdet_scope):
    from mmengine.structures import InstanceData

    det = _tiny_detector(mmdet_scope).train()
    samples = []
    for v, f, _ in CLIP_CASES[:2]:
        s = _sample(v, f)
        s.set_metainfo(dict(img_shape=(30, 30), ori_shape=(30, 30), scale_factor=(1.0, 1.0)))
        s.gt_instances = InstanceData(bboxes=torch.tensor([[2.0, 3.0, 12.0, 15.0]]), labels=torch.tensor([1]))
        samples.append(s)
    clips = [torch.randint(0, 4, (4, 20, 30, 30), dtype=torch.uint8) for _ in samples]
    data = det.data_preprocessor(dict(inputs=clips, data_samples=samples), True)
    assert data["inputs"].shape == (2, 4, 20, 32, 32)
    losses = det(**data, mode="loss")
    assert {"loss_cls", "loss_bbox", "loss_obj"} <= set(losses)
    sum(losses.values()).backward()
    assert det.backbone.net.stages[0].downsample_cf2cl.conv.weight.grad.abs().sum() > 0
    det.eval()
    with torch.no_grad():
        preds = det(**det.data_preprocessor(dict(inputs=clips, data_samples=samples), False), mode="predict")
    assert all(len(p.pred_instances) > 0 for p in preds)


def test_preprocessor_pads_to_backbone_multiple_and_keeps_counts(mmdet_scope):
    torch.manual_seed(2)
    clips = [
        torch.randint(0, 256, (3, 20, 40, 50), dtype=torch.uint8),
        torch.randint(0, 256, (3, 20, 36, 70), dtype=torch.uint8),
    ]
    clips[0][0, 0, 0, 0] = 255  # a count no normalisation could leave unchanged
    for patch, split, multiple in [(4, 2, 64), (2, 2, 64), (2, 1, 32)]:  # RVT's rule: 32 x split
        det = _tiny_detector(
            mmdet_scope, patch_size=patch, partition_split=split, out_indices=(1, 2, 3) if patch == 4 else (0, 1, 2, 3)
        )
        assert det.data_preprocessor.pad_size_divisor == det.backbone.net.pad_multiple == multiple
        samples = [_sample([True] * 3, [True, False, False]) for _ in clips]
        out = det.data_preprocessor(dict(inputs=clips, data_samples=samples), False)
        batch = out["inputs"]
        height, width = -(-40 // multiple) * multiple, -(-70 // multiple) * multiple
        assert batch.shape == (2, 3, 20, height, width) and batch.dtype == torch.float32
        for b, clip in enumerate(clips):
            h, w = clip.shape[-2:]
            assert torch.equal(batch[b, :, :, :h, :w], clip.float())  # top-left: the counts themselves
            assert not batch[b, :, :, h:].any() and not batch[b, :, :, :, w:].any()  # zeros bottom / right
        assert batch[0, 0, 0, 0, 0] == 255.0
        assert all(s.batch_input_shape == (height, width) == s.pad_shape for s in out["data_samples"])

    explicit = _tiny_detector(mmdet_scope, preprocessor=dict(type="EventClipDataPreprocessor", pad_size_divisor=64))
    assert explicit.data_preprocessor.pad_size_divisor == 64
    with pytest.raises(ValueError, match="not a multiple of the backbone's padding multiple 32"):
        _tiny_detector(mmdet_scope, preprocessor=dict(type="EventClipDataPreprocessor", pad_size_divisor=48))


def test_configs_load_with_the_experiment_values():
    from mmengine.config import Config

    base, exp = Config.fromfile(str(BASELINE)), Config.fromfile(str(PATCH2))
    assert base.model.backbone.patch_size == 4 and base.model.backbone.out_indices == (1, 2, 3)
    assert exp.model.backbone.patch_size == 2 and exp.model.backbone.out_indices == (0, 1, 2, 3)
    assert exp.model.neck.in_channels == [64, 128, 256, 512] and exp.model.bbox_head.strides == (2, 4, 8, 16)
    head = exp.model.bbox_head
    assert (head.type, head.size_aware_weight, head.small_threshold, head.medium_threshold, head.weight_type) == (
        "SizeAwareYOLOXHead",
        2.0,
        1024,
        9216,
        "exponential",
    )
    assert base.train_cfg.max_iters == base.param_scheduler[0].end == 100_000
    assert exp.train_cfg.max_iters == exp.param_scheduler[0].end == 200_000
    assert (exp.train_dataloader.batch_size, exp.val_dataloader.batch_size) == (2, 2)
    assert (exp.train_dataloader.num_workers, exp.val_dataloader.num_workers) == (4, 3)
    for cfg in (base, exp):
        assert cfg.optim_wrapper.optimizer == dict(type="AdamW", lr=3.46e-4, weight_decay=0.0)
        assert cfg.param_scheduler[0].eta_max == 3.46e-4
        assert cfg.val_evaluator.ann_file is None and cfg.val_evaluator.classwise
        assert cfg.val_evaluator.type == "RVTCocoMetric" and cfg.val_evaluator.camera == "etram"
        assert cfg.val_dataloader.dataset.sampling == cfg.test_dataloader.dataset.sampling == "streaming"
        assert cfg.val_dataloader.sampler == dict(type="RVTStreamingSampler", streams=2)
        assert len(cfg.classes) == cfg.model.bbox_head.num_classes == 8
        # RVT's SimOTA candidates and batch norms (tests/test_rvt_checkpoint.py checks what they give)
        assert cfg.model.train_cfg.assigner == dict(type="RVTSimOTAAssigner")
        assert cfg.model.bbox_head.norm_cfg == dict(type="BN", momentum=0.1, eps=1e-5)


def test_schedule_is_rvts_one_cycle():
    """From max / 20 up to the max at 0.5 % of the steps, then linearly down to max / 10000 (RVT)."""
    from mmengine.config import Config
    from mmengine.registry import PARAM_SCHEDULERS

    import rat_plugins.mm  # noqa: F401

    cfg = Config.fromfile(str(BASELINE))
    total, peak_lr = cfg.train_cfg.max_iters, cfg.optim_wrapper.optimizer.lr
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak_lr)
    scheduler = PARAM_SCHEDULERS.build(dict(cfg.param_scheduler[0], optimizer=optimizer))
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    peak = int(0.005 * total) - 1
    assert lrs[0] == pytest.approx(peak_lr / 20) and lrs[peak] == pytest.approx(peak_lr)
    assert lrs[-1] == pytest.approx(peak_lr / 10000)
    mid = (peak + total - 1) // 2  # linear annealing: halfway down at the middle of the second phase
    assert lrs[mid] == pytest.approx((peak_lr + peak_lr / 10000) / 2, rel=1e-3)


def stock_mmdet_train() -> Path:
    root = Path(importlib.util.find_spec("mmdet").submodule_search_locations[0])
    path = root / ".mim" / "tools" / "train.py"
    assert path.is_file(), path
    return path


def _tiny_options(out_indices):
    dims = "[" + ",".join(str(8 * 2**i) for i in out_indices) + "]"
    loaders = ["train_dataloader", "val_dataloader", "test_dataloader"]
    return [
        "model.backbone.embed_dim=8",
        "model.backbone.dim_head=8",
        f"model.neck.in_channels={dims}",
        "model.neck.depth=0.33",
        "model.neck.out_channels=8",
        "model.bbox_head.in_channels=8",
        "model.bbox_head.feat_channels=8",
        # after two steps no score passes RVT's 0.1 threshold and CocoMetric would have nothing
        "model.test_cfg.score_thr=0.0",
        *[f"{d}.num_workers=0" for d in loaders],
        *[f"{d}.dataset.sequence_length=3" for d in loaders],
        # the synthetic recordings last 0.6 s with small boxes: RVT's filters would leave nothing to score
        "val_evaluator.skip_first_us=0",
        "val_evaluator.min_box_diag=0",
        "val_evaluator.min_box_side=0",
        "train_cfg.max_iters=2",
        "train_cfg.val_interval=2",
        "param_scheduler.0.end=2",
        "default_hooks.checkpoint.interval=2",
        "default_hooks.logger.interval=1",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["stock", "project"])
@pytest.mark.parametrize(
    "config, out_indices", [(BASELINE, (1, 2, 3)), (PATCH2, (0, 1, 2, 3))], ids=["baseline", "patch2_4scale_sizeaware"]
)
def test_rvt_config_trains_and_validates(events_data, tmp_path, tool, config, out_indices):
    script = stock_mmdet_train() if tool == "stock" else REPO / "tools/train.py"
    run_cmd(
        [
            sys.executable,
            str(script),
            str(config),
            "--work-dir",
            str(tmp_path),
            "--cfg-options",
            *_tiny_options(out_indices),
        ],
        env={"RAT_DATASETS": str(events_data)},
    )
    assert (tmp_path / "iter_2.pth").is_file()
    records = [json.loads(s) for s in next(tmp_path.glob("*/vis_data/scalars.json")).read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert all("loss_cls" in r and "loss_obj" in r for r in train)
    val = [r for r in records if "coco/bbox_mAP" in r]
    assert len(val) == 1 and 0.0 <= val[0]["coco/bbox_mAP"] <= 1.0
    assert "coco/bbox_mAP_s" in val[0]


@pytest.mark.slow
def test_mixed_sampling_config_trains_and_validates_streaming(events_data, tmp_path):
    """RVT's mixed training (a random clip and a streamed segment per batch) and streaming validation,
    through the project's tools/train.py."""
    options = [o for o in _tiny_options((1, 2, 3)) if not o.startswith("train_dataloader.dataset.")]
    options += [f"train_dataloader.dataset.datasets.{i}.sequence_length=3" for i in (0, 1)]
    run_cmd(
        [sys.executable, str(REPO / "tools/train.py"), str(CONFIGS / "maxvit_yolox_patch4_3scale_mixed.py")]
        + ["--work-dir", str(tmp_path), "--cfg-options", *options],
        env={"RAT_DATASETS": str(events_data)},
    )
    records = [json.loads(s) for s in next(tmp_path.glob("*/vis_data/scalars.json")).read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 2
    val = [r for r in records if "coco/bbox_mAP" in r]
    assert len(val) == 1 and 0.0 <= val[0]["coco/bbox_mAP"] <= 1.0
