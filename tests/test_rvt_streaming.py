"""RVT's streaming evaluation: segments that stream each recording, the sampler that keeps them in order,
the detector carrying one state per recording (equal to one pass over the whole recording), variable
segment lengths in a batch, and RVT's box filtering before COCO AP."""

import numpy as np
import pytest
import torch

from rat_plugins.data.rvt_events import RVTEventClips, rvt_box_filter, rvt_box_thresholds, stream_schedule

from _helpers import recurrent_yolox_cfg

torch.set_num_threads(1)

CLASSES = ("pedestrian", "car", "bicycle", "bus", "motorbike", "truck", "tram", "wheelchair")  # eTraM's


@pytest.fixture
def mmdet_models():
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    import rat_plugins.mm  # noqa: F401  (registers RecurrentYOLOX, RVTEventDataset, the sampler)

    with DefaultScope.overwrite_default_scope("mmdet"):
        yield MODELS


@pytest.fixture
def gappy_events(events_data, tmp_path):
    """The synthetic set with labelled frames 1 and 2 of the first training recording removed (RVT drops
    frames whose boxes were all filtered), so its segments differ in length."""
    import shutil

    root = tmp_path / "events" / "etram"
    shutil.copytree(events_data / "events" / "etram", root)
    seq = root / "train" / "seq_0000"
    repr_path = next(seq.glob("event_representations_v2/*/objframe_idx_2_repr_idx.npy"))
    frame_repr = np.load(repr_path)
    npz = dict(np.load(seq / "labels_v2" / "labels.npz"))
    starts = np.append(npz["objframe_idx_2_label_idx"], len(npz["labels"]))
    keep = [k for k in range(len(frame_repr)) if k not in (1, 2)]
    rows = np.concatenate([np.arange(starts[k], starts[k + 1]) for k in keep])
    sizes = [starts[k + 1] - starts[k] for k in keep]
    np.save(repr_path, frame_repr[keep])
    np.savez(
        seq / "labels_v2" / "labels.npz",
        labels=npz["labels"][rows],
        objframe_idx_2_label_idx=np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64),
    )
    stamps = seq / "labels_v2" / "timestamps_us.npy"
    np.save(stamps, np.load(stamps)[keep])
    return tmp_path


def test_streaming_segments_cover_each_recording_once_in_order(gappy_events):
    root = gappy_events / "events" / "etram"
    clips = RVTEventClips(root, "train", CLASSES, sampling="streaming")
    order = clips.stream_order()
    assert len(order) == len(clips.sequences) == 2 and sorted(sum(order, [])) == list(range(len(clips)))
    for seq, samples in zip(clips.sequences, order):
        parts = [clips[i] for i in samples]
        covered = np.concatenate([p["repr_indices"] for p in parts])
        last = int(seq.frame_repr_idx[-1])
        assert covered.tolist() == list(range(last + 1))  # from representation 0, nothing twice
        assert [p["repr_idx"] for p in parts] == seq.frame_repr_idx.tolist()
        assert all(p["valid"].all() and p["labelled"][-1] for p in parts)
        assert [bool(p["is_first"][0]) for p in parts] == [True] + [False] * (len(parts) - 1)
        assert not any(p["is_first"][1:].any() for p in parts)
        assert [p["stream_end"] for p in parts] == [False] * (len(parts) - 1) + [True]
    assert len({len(clips[i]["clip"]) for i in order[0]}) > 1  # segments of different lengths
    random = RVTEventClips(root, "train", CLASSES, sequence_length=3)
    assert len(random) == len(clips) and "stream_end" not in random[0]
    assert all(random[i]["clip"].shape[0] == 3 and random[i]["is_first"].sum() == 1 for i in range(len(random)))


def test_stream_schedule_keeps_each_recording_in_order():
    order = [[0, 1, 2], [3], [4, 5]]
    assert stream_schedule(order, 1) == [0, 1, 2, 4, 5, 3]  # longest first, whole recordings
    assert stream_schedule(order, 2) == [0, 4, 1, 5, 2, 3]  # lanes [0, 1, 2] and [4, 5, 3], interleaved
    assert stream_schedule(order, 5) == [0, 4, 3, 1, 5, 2]  # more streams than recordings: one each
    with pytest.raises(ValueError, match="streams must be a positive integer"):
        stream_schedule(order, 0)


def _detector(MODELS):
    cfg = recurrent_yolox_cfg(embed_dim=8, num_classes=len(CLASSES), head_width=8)
    torch.manual_seed(0)
    det = MODELS.build(cfg).eval()
    with torch.no_grad():  # LayerScale 1e-5 would let the state barely matter
        for name, p in det.backbone.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    return det


def _dataset(events_data, sampling):
    from mmdet.registry import DATASETS

    return DATASETS.build(
        dict(
            type="RVTEventDataset",
            data_root=str(events_data / "events" / "etram"),
            split="train",
            metainfo=dict(classes=CLASSES),
            sequence_length=3,
            sampling=sampling,
            test_mode=True,
            pipeline=[dict(type="PackEventClip")],
        )
    )


def _batches(dataset, order, batch_size):
    from mmengine.dataset import pseudo_collate

    for start in range(0, len(order), batch_size):
        yield pseudo_collate([dataset[i] for i in order[start : start + batch_size]])


@pytest.mark.parametrize("streams, batch_size", [(2, 2), (1, 2), (1, 1)])
def test_streamed_detector_equals_one_pass_over_each_recording(mmdet_models, gappy_events, streams, batch_size):
    """Batch by batch, the neck output at each labelled frame is the one a single pass over the whole
    recording from its first representation gives (states carried); (1, 2) puts two segments of one
    recording into one batch."""
    from rat_plugins.mm.datasets import RVTStreamingSampler

    det = _detector(mmdet_models)
    dataset = _dataset(gappy_events, "streaming")
    order = list(RVTStreamingSampler(dataset, streams=streams))
    assert sorted(order) == list(range(len(dataset)))
    clips = dataset.clips
    whole = {}
    with torch.no_grad():
        for seq in clips.sequences:  # the reference: every representation of the recording, one clip
            events = torch.from_numpy(clips._dataset(clips.sequences.index(seq))[:]).float()[None]
            feats, _ = det.backbone.net.forward_clip(events, return_all=True)
            whole[seq.name] = feats
        got, lengths = {}, set()
        for batch in _batches(dataset, order, batch_size):
            data = det.data_preprocessor(batch, False)
            lengths.add(data["inputs"].shape[1])
            for sample, neck_map in zip(
                data["data_samples"], det.extract_feat(data["inputs"], data["data_samples"])[0]
            ):
                got[(sample.sequence, sample.repr_idx)] = neck_map
        assert det._streams == {}  # every recording's state dropped after its last segment
        for (name, repr_idx), neck_map in got.items():
            stages = [whole[name][f"stage{s}"][:, repr_idx] for s in (2, 3, 4)]
            assert torch.allclose(neck_map, det.neck(stages)[0][0], atol=1e-5), (name, repr_idx)
    assert len(got) == len(dataset) and max(lengths) > 2

    # zero-state clips of 3 representations see less of the past: later frames differ
    clip_mode = _dataset(gappy_events, "random")
    with torch.no_grad():
        sample = clip_mode[len(clip_mode) - 1]  # the last labelled frame of a recording
        data = det.data_preprocessor(dict(inputs=[sample["inputs"]], data_samples=[sample["data_samples"]]), False)
        short = det.extract_feat(data["inputs"], data["data_samples"])[0][0]
    key = (sample["data_samples"].sequence, sample["data_samples"].repr_idx)
    assert key[1] >= 3 and not torch.allclose(short, got[key], atol=1e-3)


def test_segments_out_of_order_are_refused(mmdet_models, events_data):
    det = _detector(mmdet_models)
    dataset = _dataset(events_data, "streaming")
    first_recording = dataset.stream_order()[0]
    with torch.no_grad():
        batch = next(_batches(dataset, [first_recording[1]], 1))  # its second segment, without the first
        data = det.data_preprocessor(batch, False)
        with pytest.raises(RuntimeError, match="must come in order.*RVTStreamingSampler"):
            det.extract_feat(data["inputs"], data["data_samples"])
    from rat_plugins.mm.datasets import RVTStreamingSampler

    with pytest.raises(ValueError, match="sampling='streaming'"):
        RVTStreamingSampler(_dataset(events_data, "random"))


def test_preprocessor_front_pads_segments_of_different_lengths(mmdet_models, gappy_events):
    det = _detector(mmdet_models)
    dataset = _dataset(gappy_events, "streaming")
    first, second = dataset.stream_order()[0][:2]
    batch = next(_batches(dataset, [first, second], 2))
    lengths = [int(c.shape[0]) for c in batch["inputs"]]
    assert lengths[0] != lengths[1]
    data = det.data_preprocessor(batch, False)
    steps = max(lengths)
    assert data["inputs"].shape[1] == steps
    short = int(np.argmin(lengths))
    pad = steps - lengths[short]
    sample = data["data_samples"][short]
    assert sample.valid.tolist() == [False] * pad + [True] * lengths[short]
    assert not sample.is_first[:pad].any() and len(sample.labelled) == steps
    assert not data["inputs"][short, :pad].any()
    with pytest.raises(ValueError, match="no valid masks"):
        det.data_preprocessor(dict(inputs=[torch.zeros(2, 20, 8, 8), torch.zeros(3, 20, 8, 8)]), False)


def test_rvt_box_filter_thresholds():
    assert rvt_box_thresholds("gen1", False) == (30, 10) and rvt_box_thresholds("1mpx", False) == (60, 20)
    assert rvt_box_thresholds("etram", True) == (30, 10) and rvt_box_thresholds("gen4", True) == (30, 10)
    with pytest.raises(ValueError, match="camera must be one of"):
        rvt_box_thresholds("davis", False)
    boxes = [[0, 0, 30, 30], [0, 0, 9, 40], [0, 0, 20, 20], [5, 5, 26.3, 26.3]]  # diag 42.4, side 9, diag 28.3, 30.1
    assert rvt_box_filter(boxes, 600_000, 30, 10).tolist() == [True, False, False, True]
    assert not rvt_box_filter(boxes, 500_000, 30, 10).any()  # RVT keeps only t > 0.5 s


def _sample(img_id, t, gt, pred, scores):
    gt = [dict(bbox=list(map(float, b)), bbox_label=0, ignore_flag=0) for b in gt]
    pred = torch.tensor(pred, dtype=torch.float32).reshape(-1, 4)
    return dict(
        img_id=img_id,
        timestamp_us=t,
        ori_shape=(64, 64),
        instances=gt,
        pred_instances=dict(
            bboxes=pred, scores=torch.tensor(scores), labels=torch.zeros(len(scores), dtype=torch.long)
        ),
    )


def test_rvt_coco_metric_scores_what_rvt_keeps(mmdet_models):
    from mmdet.evaluation.metrics import CocoMetric
    from mmdet.registry import METRICS

    big, small = [2, 2, 40, 40], [50, 50, 56, 56]
    frames = [
        # scored frame: the big object found, the small one (side 6 < 10) dropped from both sides
        _sample(0, 600_000, [big, small], [big, [20, 20, 60, 60]], [0.9, 0.8]),
        # the first 0.5 s: nothing counts, not even a missed object or a false positive
        _sample(1, 100_000, [big], [[10, 10, 50, 50]], [0.7]),
    ]
    metric = METRICS.build(dict(type="RVTCocoMetric", camera="gen1", downsampled_by_2=False, ann_file=None))
    metric.dataset_meta = dict(classes=("car",))
    metric.process({}, frames)
    rvt = metric.compute_metrics(metric.results)
    plain = CocoMetric(ann_file=None)
    plain.dataset_meta = dict(classes=("car",))
    plain.process(
        {}, [_sample(0, 600_000, [big], [big, [20, 20, 60, 60]], [0.9, 0.8]), _sample(1, 100_000, [], [], [])]
    )
    expected = plain.compute_metrics(plain.results)
    assert rvt["bbox_mAP"] == pytest.approx(expected["bbox_mAP"]) and rvt["bbox_mAP"] == pytest.approx(1.0)
    unfiltered = CocoMetric(ann_file=None)
    unfiltered.dataset_meta = dict(classes=("car",))
    unfiltered.process({}, frames)
    assert unfiltered.compute_metrics(unfiltered.results)["bbox_mAP"] < 0.9
    with pytest.raises(KeyError, match="timestamp_us"):
        metric.process({}, [{k: v for k, v in frames[0].items() if k != "timestamp_us"}])


def test_mixed_schedule_batches_lanes_and_shares():
    from rat_plugins.data.rvt_events import MixedSchedule

    recordings = [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    schedule = MixedSchedule(num_random=5, stream_order=recordings, random_per_batch=2, streams=1, seed=3)
    epochs = [schedule.next_epoch() for _ in range(3)]
    assert all(len(e) == 3 * 3 for e in epochs)  # ceil(5 / 2) batches of 2 random + 1 streamed
    randoms = [[i for j, i in enumerate(e) if j % 3 < 2] for e in epochs]
    assert all(set(r) == set(range(5)) for r in randoms) and randoms[0] != randoms[1]  # every clip, reshuffled
    streamed = [i - 5 for e in epochs for j, i in enumerate(e) if j % 3 == 2]
    # the lane goes on across epochs: whole recordings, each in order, a shuffled cycle of all three
    runs, start = [], 0
    while start < len(streamed):
        recording = next(r for r in recordings if r[0] == streamed[start])
        assert streamed[start : start + len(recording)] == recording[: len(streamed) - start]
        runs.append(recording[0])
        start += len(recording)
    assert set(runs[:3]) == {0, 3, 5}
    again = MixedSchedule(num_random=5, stream_order=recordings, random_per_batch=2, streams=1, seed=3)
    assert [again.next_epoch() for _ in range(3)] == epochs  # a replay after a resume sees the same batches

    shares = [MixedSchedule(4, recordings, 1, 1, seed=0, rank=r, world_size=2) for r in (0, 1)]
    firsts = [s.next_epoch() for s in shares]
    assert {i for i in firsts[0][::2]}.isdisjoint(firsts[1][::2])  # random clips split between the ranks
    assert shares[0].recordings == [recordings[0], recordings[2]] and shares[1].recordings == [recordings[1]]
    with pytest.raises(ValueError, match="not both 0"):
        MixedSchedule(4, recordings, 0, 0)


def test_mixed_batches_carry_streamed_states_and_reset_at_recording_starts(mmdet_models, gappy_events):
    """Batches of RVTMixedSampler: the random clips run from a zero state, the streamed segments from
    their recording's carried state (equal to one pass over the recording), through several recordings
    and into the next epoch; a training step keeps the carried states detached."""
    from mmengine.dataset import ConcatDataset

    from rat_plugins.mm.datasets import RVTMixedSampler

    det = _detector(mmdet_models)
    random_part, stream_part = _dataset(gappy_events, "random"), _dataset(gappy_events, "streaming")
    dataset = ConcatDataset([random_part, stream_part])
    sampler = RVTMixedSampler(dataset, random_per_batch=1, streams=1, seed=0)
    order = list(sampler) + list(sampler)  # two epochs
    assert len(order) == 2 * 2 * len(random_part)
    clips = stream_part.clips
    whole = {}
    with torch.no_grad():
        for s, seq in enumerate(clips.sequences):
            events = torch.from_numpy(clips._dataset(s)[:]).float()[None]
            whole[seq.name] = det.backbone.net.forward_clip(events, return_all=True)[0]
        checked = {"random": 0, "streamed": 0}
        for batch in _batches(dataset, order, 2):
            data = det.data_preprocessor(batch, False)
            neck = det.extract_feat(data["inputs"], data["data_samples"])[0]
            for b, sample in enumerate(data["data_samples"]):
                if "stream_end" in sample:
                    stages = [whole[sample.sequence][f"stage{s}"][:, sample.repr_idx] for s in (2, 3, 4)]
                    checked["streamed"] += 1
                else:
                    alone = det.backbone.forward_clip(
                        data["inputs"][b : b + 1], valid=sample.valid[None], is_first=sample.is_first[None]
                    )
                    stages = list(alone)
                    checked["random"] += 1
                assert torch.allclose(neck[b], det.neck(stages)[0][0], atol=1e-5), sample.sequence
    assert checked == {"random": len(order) // 2, "streamed": len(order) // 2}
    assert checked["streamed"] > len(stream_part)  # the lane went on into a second pass of the recordings

    from mmengine.structures import InstanceData

    det.train()
    det.reset_streams()
    # a batch whose streamed segment is not its recording's last, so its state is kept
    batch = next(b for b in _batches(dataset, list(sampler), 2) if not b["data_samples"][1].stream_end)

    for sample in batch["data_samples"]:
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[4.0, 4.0, 20.0, 20.0]]), labels=torch.tensor([1]))
    data = det.data_preprocessor(batch, True)
    losses = det.loss(data["inputs"], data["data_samples"])
    sum(losses.values()).backward()
    assert det._streams and all(h.grad_fn is None for _, states in det._streams.values() for h, _ in states)
