"""RVT's memory control: an object that stops emitting events stays detectable only through the LSTM
states. A small RecurrentYOLOX trained on such recordings finds it when the recordings are streamed
(states carried from each recording's start, RVT's evaluation) and loses it in zero-state clips."""

import pytest
import torch

from _helpers import recurrent_yolox_cfg

torch.set_num_threads(2)

ITERS, BATCH, LR = 300, 8, 2e-3


def _build(MODELS):
    cfg = recurrent_yolox_cfg(embed_dim=16, num_classes=1, head_width=32, test_cfg=dict(score_thr=0.01))
    torch.manual_seed(0)
    det = MODELS.build(cfg)
    det.init_weights()
    return det


def _dataset(root, split, **kwargs):
    from mmdet.registry import DATASETS

    return DATASETS.build(
        dict(
            type="RVTEventDataset",
            data_root=str(root),
            split=split,
            metainfo=dict(classes=("object",)),
            test_mode=split != "train",
            pipeline=[dict(type="PackEventClip")],
            **kwargs,
        )
    )


def _ap50(det, dataset, order, batch_size):
    from mmdet.evaluation.metrics import CocoMetric
    from mmengine.dataset import pseudo_collate

    metric = CocoMetric(ann_file=None, metric="bbox")
    metric.dataset_meta = dataset.metainfo
    det.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = pseudo_collate([dataset[i] for i in order[start : start + batch_size]])
            data = det.data_preprocessor(batch, False)
            preds = det.predict(data["inputs"], data["data_samples"], rescale=False)
            metric.process({}, [p.to_dict() for p in preds])
    detections = sum(len(result["labels"]) for _, result in metric.results)
    # with no detection at all CocoMetric reports nothing: an AP of 0
    return metric.compute_metrics(metric.results)["bbox_mAP_50"] if detections else 0.0


@pytest.mark.slow
def test_streaming_keeps_what_zero_state_clips_lose(tmp_path):
    from mmdet.registry import MODELS
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import DefaultScope

    import rat_plugins.mm  # noqa: F401  (registers the RVT parts)
    from rat_plugins.data.synthetic import make_events_memory
    from rat_plugins.mm.datasets import RVTStreamingSampler

    root = tmp_path / "events" / "memory"
    summary = make_events_memory(root, n=64, seed=0, size=32, frames=8, emit=2)
    assert summary["labelled_representations"] == [4, 6]
    with DefaultScope.overwrite_default_scope("mmdet"):
        det = _build(MODELS)
        # training clips hold the whole recording up to the labelled frame (front-padded to 8, a
        # zero state at representation 0), so the events of the object are always in them
        train = _dataset(root, "train", sequence_length=8)
        optimizer = torch.optim.AdamW(det.parameters(), lr=LR)
        g = torch.Generator().manual_seed(0)
        det.train()
        for _ in range(ITERS):
            picks = torch.randint(0, len(train), (BATCH,), generator=g).tolist()
            data = det.data_preprocessor(pseudo_collate([train[i] for i in picks]), True)
            loss = sum(det.loss(data["inputs"], data["data_samples"]).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        streamed = _dataset(root, "val", sampling="streaming")
        streamed_ap = _ap50(det, streamed, list(RVTStreamingSampler(streamed, streams=4)), 4)
        clips = _dataset(root, "val", sequence_length=2)  # the two silent representations before each frame
        clip_ap = _ap50(det, clips, list(range(len(clips))), 4)
    assert streamed_ap >= 0.8 and clip_ap <= 0.1, (streamed_ap, clip_ap)
