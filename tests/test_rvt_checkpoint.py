"""Whole RVT detector checkpoints in mmdet's RecurrentYOLOX: every tensor loads, and the detector
reproduces RVT step by step (backbone, PAFPN, head, decoding, postprocess) against the independent
reference in ``rvt_reference.py``; RVT's YOLOX loss with ``RVTSimOTAAssigner``; the converter tool
and ``tools/test.py`` on a converted file."""

import logging
import sys

import pytest
import rvt_reference as rvt
import torch

from _helpers import REPO, recurrent_yolox_cfg, run_cmd

torch.set_num_threads(1)

EMBED, DIM_HEAD, NUM_CLASSES = 16, 8, 3  # stage dims 16 / 32 / 64 / 128; head width int(256 * 128 / 1024) = 32
HEAD_WIDTH = 32
STRIDES = (8, 16, 32)
SIZE = 64
BASELINE = REPO / "projects/RVT/configs/maxvit_yolox_patch4_3scale_baseline.py"


@pytest.fixture
def mmdet_models():
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    import rat_plugins.mm  # noqa: F401  (registers RecurrentYOLOX and the RVT parts)

    with DefaultScope.overwrite_default_scope("mmdet"):
        yield MODELS


def _lightning_file(path, state_dict):
    """RVT's Lightning layout: the weights under ``state_dict`` plus Lightning's bookkeeping."""
    torch.save(
        {
            "epoch": 3,
            "global_step": 999,
            "pytorch-lightning_version": "1.8.6",
            "state_dict": state_dict,
            "loops": {"fit_loop": {"epoch_loop.batch_progress": {"total": {"ready": 999}}}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 3.46e-4, "params": []}]}],
        },
        path,
    )
    return path


def _detector_cfg(num_classes=NUM_CLASSES, **overrides):
    cfg = recurrent_yolox_cfg(
        embed_dim=EMBED,
        num_classes=num_classes,
        head_width=HEAD_WIDTH,
        bbox_head=dict(norm_cfg=dict(type="BN", momentum=0.1, eps=1e-5)),  # RVT's batch norms: PyTorch's defaults
        test_cfg=dict(score_thr=0.1),  # RVT's postprocess: confidence 0.1, NMS 0.45
    )
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return cfg


def _events(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.full((1, steps, 20, SIZE, SIZE), 0.4), generator=g).clamp(max=10)


def _predict_samples(valid_steps):
    from mmdet.structures import DetDataSample

    sample = DetDataSample()
    sample.set_metainfo(
        dict(
            img_shape=(SIZE, SIZE),
            ori_shape=(SIZE, SIZE),
            scale_factor=(1.0, 1.0),
            valid=torch.ones(valid_steps, dtype=torch.bool),
            is_first=torch.arange(valid_steps) == 0,
        )
    )
    return [sample]


def _sorted_by_score(boxes, scores, labels):
    order = torch.argsort(scores, descending=True)
    return boxes[order], scores[order], labels[order]


def test_whole_rvt_checkpoint_reproduces_rvt_step_by_step(mmdet_models, tmp_path, caplog):
    sd = rvt.official_rvt_state_dict(EMBED, NUM_CLASSES, seed=0)
    path = _lightning_file(tmp_path / "rvt-custom.ckpt", sd)
    det = mmdet_models.build(_detector_cfg(load_from_rvt=str(path)))
    with caplog.at_level(logging.INFO, logger="rat_plugins.mm.rvt_checkpoint"):
        det.init_weights()
    det.eval()
    report = det.rvt_checkpoint_report
    assert (report.backbone, report.loaded, report.stem, report.warnings) == (124, len(sd), "loaded", [])
    assert report.meta == {"epoch": 3, "global_step": 999, "pytorch-lightning_version": "1.8.6"}
    assert any(f"loaded {len(sd)} RVT tensors" in r.getMessage() for r in caplog.records)

    head = det.bbox_head
    clip = _events(steps=3)
    ref_states, our_states, checked_nms = None, None, False
    with torch.no_grad():
        for t in range(clip.shape[1]):
            x = clip[:, t]
            ref_maps, ref_states = rvt.backbone_step(sd, x, ref_states, patch=4, dim_head=DIM_HEAD)
            ours, our_states = det.backbone.net(x, our_states)
            for ref_map, our_map in zip(ref_maps, ours.values()):
                assert torch.allclose(our_map, ref_map, atol=1e-5), (t, (our_map - ref_map).abs().max())

            ref_fpn = rvt.pafpn(sd, ref_maps[1:])
            neck_out = det.neck(tuple(ours.values())[1:])  # RVT's PAFPN and its head stems
            for k, (ref_level, our_level) in enumerate(zip(ref_fpn, neck_out)):
                stem = rvt.base_conv(sd, f"mdl.yolox_head.stems.{k}", ref_level)
                assert torch.allclose(our_level, stem, atol=1e-3), (t, k, (our_level - stem).abs().max())

            ref_raw = rvt.head_raw(sd, ref_fpn)
            cls_scores, bbox_preds, objectnesses = head.forward(neck_out)
            for (reg, obj, cls), our_reg, our_obj, our_cls in zip(ref_raw, bbox_preds, objectnesses, cls_scores):
                for ref_out, our_out in ((reg, our_reg), (obj, our_obj), (cls, our_cls)):
                    assert torch.allclose(our_out, ref_out, atol=5e-4), (t, (our_out - ref_out).abs().max())

            decoded = rvt.decode(ref_raw, STRIDES)[0]  # cx, cy, w, h, obj, class probabilities
            priors = torch.cat(
                head.prior_generator.grid_priors(
                    [c.shape[2:] for c in cls_scores], dtype=x.dtype, device="cpu", with_stride=True
                )
            )
            flat = [
                torch.cat([m[0].permute(1, 2, 0).reshape(-1, m.shape[1]) for m in maps])
                for maps in (bbox_preds, objectnesses, cls_scores)
            ]
            our_boxes = head._bbox_decode(priors, flat[0])
            ref_boxes = torch.cat([decoded[:, :2] - decoded[:, 2:4] / 2, decoded[:, :2] + decoded[:, 2:4] / 2], 1)
            assert torch.allclose(our_boxes, ref_boxes, rtol=1e-4, atol=1e-4)
            assert torch.allclose(flat[1].sigmoid(), decoded[:, 4:5], atol=1e-4)
            assert torch.allclose(flat[2].sigmoid(), decoded[:, 5:], atol=1e-4)

            # the final detections: mmdet's predict over the clip so far (a zero state at step 0)
            ref_dets = rvt.postprocess(rvt.decode(ref_raw, STRIDES).clone(), NUM_CLASSES, 0.1, 0.45)[0]
            samples = _predict_samples(t + 1)
            data = det.data_preprocessor(dict(inputs=[clip[0, : t + 1]], data_samples=samples), False)
            pred = det.predict(data["inputs"], data["data_samples"], rescale=False)[0].pred_instances
            got = _sorted_by_score(pred.bboxes, pred.scores, pred.labels)
            want = _sorted_by_score(ref_dets[:, :4], ref_dets[:, 4] * ref_dets[:, 5], ref_dets[:, 6].long())
            assert len(got[0]) == len(want[0]) > 0, t
            assert torch.allclose(got[0], want[0], rtol=1e-4, atol=1e-3)
            assert torch.allclose(got[1], want[1], atol=1e-4)
            assert torch.equal(got[2], want[2])
            # the comparison saw both filters work: the threshold and the NMS each removed detections
            passing = int((decoded[:, 4] * decoded[:, 5:].max(1).values >= 0.1).sum())
            assert len(want[0]) < passing < len(decoded)
            checked_nms = True
    assert checked_nms


def test_rvt_checkpoint_mismatches_name_the_fix(mmdet_models, tmp_path):
    sd = rvt.official_rvt_state_dict(EMBED, NUM_CLASSES, seed=1)
    path = _lightning_file(tmp_path / "rvt.ckpt", sd)
    from rat_plugins.mm.rvt_checkpoint import load_rvt_detector

    eight = mmdet_models.build(_detector_cfg(num_classes=8))
    with pytest.raises(ValueError, match=r"num_classes: checkpoint 3, model 8.*bbox_head.num_classes=3"):
        load_rvt_detector(eight, path)
    mmdet_eps = mmdet_models.build(_detector_cfg(bbox_head=dict(norm_cfg=dict(type="BN", momentum=0.03, eps=1e-3))))
    report = load_rvt_detector(mmdet_eps, path)
    assert report.loaded == len(sd) and "eps=1e-05" in report.warnings[0]
    no_stems = mmdet_models.build(_detector_cfg(neck=dict(out_channels=None)))
    with pytest.raises(ValueError, match="out_channels"):
        load_rvt_detector(no_stems, path)
    extra = dict(sd, **{"mdl.yolox_head.iou_preds.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="iou_preds"):
        load_rvt_detector(mmdet_models.build(_detector_cfg()), extra)
    small = rvt.official_rvt_state_dict(8, NUM_CLASSES, seed=1)  # another model size: the backbone says so
    with pytest.raises(ValueError, match="backbone: .*does not fit this MaxViTRNN"):
        load_rvt_detector(mmdet_models.build(_detector_cfg()), small)


def _random_head_outputs(batch, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [SIZE // s for s in STRIDES]
    return [
        (
            0.5 * torch.randn(batch, 4, n, n, generator=g),
            torch.randn(batch, 1, n, n, generator=g) - 1,
            torch.randn(batch, NUM_CLASSES, n, n, generator=g) - 1,
        )
        for n in sizes
    ]


def _labels():
    """Per image ``[n, 5]`` = class, cx, cy, w, h (RVT's label layout), one image without objects."""
    return [
        torch.tensor([[0, 20.0, 18.0, 14.0, 10.0], [2, 44.0, 40.0, 30.0, 36.0], [1, 30.0, 50.0, 8.0, 6.0]]),
        torch.zeros(0, 5),
        torch.tensor([[1, 12.0, 40.0, 20.0, 12.0], [1, 16.0, 44.0, 18.0, 20.0]]),  # overlapping: shared priors
    ]


def _mmdet_loss(head, raw, labels):
    from mmengine.structures import InstanceData

    cls_scores, bbox_preds, objectnesses = ([level[i] for level in raw] for i in (2, 0, 1))
    gts = [
        InstanceData(
            bboxes=torch.cat([lab[:, 1:3] - lab[:, 3:5] / 2, lab[:, 1:3] + lab[:, 3:5] / 2], 1),
            labels=lab[:, 0].long(),
        )
        for lab in labels
    ]
    metas = [dict(img_shape=(SIZE, SIZE), batch_input_shape=(SIZE, SIZE))] * len(labels)
    return head.loss_by_feat(cls_scores, bbox_preds, objectnesses, gts, metas)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rvt_assigner_gives_rvts_yolox_loss(mmdet_models, seed):
    """mmdet's YOLOXHead with RVTSimOTAAssigner: RVT's IoU, objectness and class terms, same normaliser."""
    head = mmdet_models.build(_detector_cfg()).bbox_head
    raw, labels = _random_head_outputs(len(_labels()), seed), _labels()
    want = rvt.yolox_loss(raw, STRIDES, labels, NUM_CLASSES)
    got = _mmdet_loss(head, raw, labels)
    for ours, theirs in (("loss_bbox", "iou_loss"), ("loss_obj", "conf_loss"), ("loss_cls", "cls_loss")):
        assert got[ours].item() == pytest.approx(want[theirs].item(), rel=1e-5), ours
    assert sum(got.values()).item() == pytest.approx(want["loss"].item(), rel=1e-5)


def test_stock_assigner_differs_only_by_its_larger_candidate_set(mmdet_models):
    """mmdet's SimOTAAssigner takes priors in a box or within 2.5 strides of its centre; RVT's only
    those within 1.5 strides. Its candidates contain RVT's, and the extra ones change the loss."""
    from mmdet.models.task_modules.assigners import SimOTAAssigner

    from rat_plugins.mm.yolox_rvt import RVTSimOTAAssigner

    labels = _labels()[0]
    gt = torch.cat([labels[:, 1:3] - labels[:, 3:5] / 2, labels[:, 1:3] + labels[:, 3:5] / 2], 1)
    head = mmdet_models.build(_detector_cfg()).bbox_head
    priors = torch.cat(
        head.prior_generator.grid_priors([(SIZE // s,) * 2 for s in STRIDES], device="cpu", with_stride=True)
    )
    centres = torch.cat([priors[:, :2] + priors[:, 2:] * 0.5, priors[:, 2:]], 1)  # what mmdet's head passes
    rvt_candidates, _ = RVTSimOTAAssigner().get_in_gt_and_in_center_info(centres, gt)
    stock_candidates, _ = SimOTAAssigner(center_radius=2.5).get_in_gt_and_in_center_info(centres, gt)
    assert rvt_candidates.sum() < stock_candidates.sum() and not (rvt_candidates & ~stock_candidates).any()

    stock = mmdet_models.build(_detector_cfg(train_cfg=dict(assigner=dict(type="SimOTAAssigner")))).bbox_head
    raw = _random_head_outputs(3, seed=0)
    want = rvt.yolox_loss(raw, STRIDES, _labels(), NUM_CLASSES)
    assert _mmdet_loss(stock, raw, _labels())["loss_obj"].item() != pytest.approx(want["conf_loss"].item(), rel=1e-3)


def _tool_options():
    loaders = ["val_dataloader", "test_dataloader"]
    return [
        f"model.backbone.embed_dim={EMBED}",
        f"model.backbone.dim_head={DIM_HEAD}",
        "model.neck.in_channels=[32,64,128]",
        "model.neck.depth=0.33",
        f"model.neck.out_channels={HEAD_WIDTH}",
        f"model.bbox_head.in_channels={HEAD_WIDTH}",
        f"model.bbox_head.feat_channels={HEAD_WIDTH}",
        *[f"{d}.num_workers=0" for d in loaders],
        *[f"{d}.dataset.sequence_length=3" for d in loaders],
        # the synthetic recordings last 0.6 s with small boxes: RVT's filters would leave nothing to score
        "test_evaluator.skip_first_us=0",
        "test_evaluator.min_box_diag=0",
        "test_evaluator.min_box_side=0",
    ]


@pytest.mark.slow
def test_converted_rvt_checkpoint_evaluates_with_tools_test(events_data, tmp_path):
    """tools/convert_rvt_checkpoint.py writes an mmengine file the baseline config loads strictly in
    tools/test.py (its CheckpointFitHook refuses any missing or unexpected key)."""
    sd = rvt.official_rvt_state_dict(EMBED, num_classes=8, seed=2)  # eTraM's 8 classes
    ckpt = _lightning_file(tmp_path / "rvt.ckpt", sd)
    out = tmp_path / "converted" / "rvt_mmdet.pth"
    options = ["--cfg-options", *_tool_options()]
    result = run_cmd(
        [sys.executable, "tools/convert_rvt_checkpoint.py", str(ckpt), str(out), "--config", str(BASELINE), *options]
    )
    assert f"loaded {len(sd)} RVT tensors" in result.stdout and out.is_file()
    converted = torch.load(out, weights_only=True)
    assert converted["meta"]["rvt"]["global_step"] == 999
    assert torch.equal(
        converted["state_dict"]["bbox_head.multi_level_conv_obj.2.bias"], sd["mdl.yolox_head.obj_preds.2.bias"]
    )

    result = run_cmd(
        [sys.executable, "tools/test.py", str(BASELINE), str(out), "--work-dir", str(tmp_path / "eval"), *options],
        env={"RAT_DATASETS": str(events_data)},
    )
    assert "coco/bbox_mAP" in result.stdout + result.stderr

    wrong = run_cmd(
        [
            sys.executable,
            "tools/convert_rvt_checkpoint.py",
            str(ckpt),
            str(tmp_path / "x.pth"),
            "--config",
            str(BASELINE),
        ],
        check=False,
    )
    assert wrong.returncode == 2 and "does not fit" in wrong.stderr and not (tmp_path / "x.pth").exists()
