#!/usr/bin/env python
"""RVT training step, patch 4 / 3 scales (baseline) vs patch 2 / 4 scales (size-aware): time and memory.

    python benchmarks/bench_rvt.py [--size 256x320] [--clip-len 2] [--batch 1] [--embed N] [--steps 3]
        [--warmup 1] [--device cpu|cuda] [--threads N] [--baseline CFG] [--experiment CFG] [--json OUT]

Both models are built from their configs and run ``model.train_step`` (preprocessing, the recurrent
forward over the clip, YOLOX loss, backward, AdamW) on the same random clips and boxes, each in its
own process. Reported: median step time, the bytes autograd saves for backward (activation memory),
parameters, peak CUDA allocation or peak RSS, and the ratios experiment / baseline. ``--embed``
shrinks the widths so a CPU run takes minutes.
"""

import argparse
import json
import os
import sys
import time

from _timing import (
    SavedForBackward,
    add_threads_argument,
    median_time,
    peak_rss_mb,
    print_table,
    run_child,
    set_threads,
    threads_argv,
)

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "projects", "RVT", "configs")
MODES = {
    "baseline": os.path.join(CONFIGS, "maxvit_yolox_patch4_3scale_baseline.py"),
    "experiment": os.path.join(CONFIGS, "patch2_4scale_sizeaware_200k.py"),
}


def _size(text):
    h, _, w = text.lower().partition("x")
    return int(h), int(w or h)


def _parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--baseline", default=MODES["baseline"])
    p.add_argument("--experiment", default=MODES["experiment"])
    p.add_argument("--size", type=_size, default=(256, 320), help="input HxW (or one number: square)")
    p.add_argument("--clip-len", type=int, default=2, help="event representations per clip (configs: 5)")
    p.add_argument("--batch", type=int, default=1, help="clips per batch (configs: 2)")
    p.add_argument("--embed", type=int, default=None, help="backbone embed_dim override (configs: base, 64)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    add_threads_argument(p)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", choices=tuple(MODES), help=argparse.SUPPRESS)
    return p


def _shrink(cfg, embed):
    """Scale backbone / neck / head widths to ``embed`` as the base config relates them to 64."""
    bb = cfg.model.backbone
    bb.embed_dim = embed
    bb.dim_head = min(32, embed)
    cfg.model.neck.in_channels = [embed * 2**i for i in bb.out_indices]
    cfg.model.neck.out_channels = 2 * embed
    cfg.model.bbox_head.in_channels = cfg.model.bbox_head.feat_channels = 2 * embed


def _child(args):
    import torch
    from mmengine.config import Config, ConfigDict
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmengine.structures import InstanceData

    import rat_plugins.mm  # noqa: F401

    set_threads(args.threads)
    device = torch.device(args.device)
    cfg = Config.fromfile(getattr(args, args.child))
    if args.embed:
        _shrink(cfg, args.embed)
    DefaultScope.get_instance(f"bench-rvt-{time.time()}", scope_name=cfg.get("default_scope", "mmdet"))
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample

    torch.manual_seed(0)
    model = MODELS.build(ConfigDict(cfg.model.to_dict()))
    model.init_weights()
    model.to(device).train()
    optim = build_optim_wrapper(model, cfg.optim_wrapper)

    H, W, T, B = *args.size, args.clip_len, args.batch
    in_chans = cfg.model.backbone.get("in_chans", 20)
    g = torch.Generator().manual_seed(0)  # the same clips and boxes in both processes
    clips = [torch.randint(0, 4, (T, in_chans, H, W), generator=g, dtype=torch.uint8) for _ in range(B)]
    # small (<= 1024 px^2), medium and large boxes, clipped to the image
    wh = torch.tensor([[12.0, 10.0], [24.0, 30.0], [40.0, 25.0], [120.0, 90.0]])
    samples = []
    for _ in range(B):
        xy = torch.rand(len(wh), 2, generator=g) * torch.tensor([W, H]) * 0.6
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([W - 1.0, H - 1.0]))], 1)
        s = DetDataSample()
        s.set_metainfo(
            dict(
                img_shape=(H, W),
                ori_shape=(H, W),
                scale_factor=(1.0, 1.0),
                valid=torch.ones(T, dtype=torch.bool),
                is_first=torch.arange(T) == 0,
            )
        )
        s.gt_instances = InstanceData(bboxes=boxes, labels=torch.arange(len(wh)) % cfg.model.bbox_head.num_classes)
        samples.append(s)
    data = dict(inputs=clips, data_samples=samples)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    saved = SavedForBackward()

    losses = {}

    def step():
        losses.update(model.train_step(data, optim))
        sync()

    # one counted step (not timed: the hook costs time), then the timed ones
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with saved.hooks():
        step()
    step_s = median_time(step, args.steps, warmup=max(args.warmup - 1, 0))
    result = dict(
        mode=args.child,
        config=os.path.basename(getattr(args, args.child)),
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        threads=torch.get_num_threads(),
        patch_size=cfg.model.backbone.patch_size,
        scales=len(cfg.model.backbone.out_indices),
        strides=list(cfg.model.bbox_head.strides),
        head=cfg.model.bbox_head.type,
        embed_dim=model.backbone.net.embed_dim,
        input=[B, T, in_chans, *data_shape(model, data)],
        step_s=step_s,
        loss=float(sum(v for k, v in losses.items() if "loss" in k)),
        params=sum(p.numel() for p in model.parameters()),
        saved_for_backward_mb=saved.mb,
    )
    if device.type == "cuda":
        result["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))
    return 0


def data_shape(model, data):
    """Padded H, W the model sees (the preprocessor pads to the backbone's multiple)."""
    return model.data_preprocessor.padded_size(*data["inputs"][0].shape[-2:])


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.device is None:
        try:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            args.device = "cpu"
    if args.child:
        return _child(args)
    results = []
    for mode in MODES:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--baseline",
            args.baseline,
            "--experiment",
            args.experiment,
            "--size",
            "x".join(map(str, args.size)),
            "--clip-len",
            str(args.clip_len),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
            "--child",
            mode,
        ]
        cmd += ["--embed", str(args.embed)] if args.embed else []
        cmd += threads_argv(args.threads)
        result = run_child(cmd, mode)
        if result is None:
            return 1
        results.append(result)
    base, exp = results
    shape = "x".join(map(str, base["input"]))
    print(
        f"RVT train step (forward over the clip + loss + backward + AdamW), input {shape} "
        f"(padded), embed {base['embed_dim']}, {base['device']} ({base['threads']} threads), median of "
        f"{args.steps} steps"
    )
    mem = "peak alloc MB" if "peak_allocated_mb" in base else "peak RSS MB"
    cols = ["model", "patch", "scales", "strides", "head", "params M", "step s", "saved for bwd MB", mem]
    rows = [
        [
            r["mode"],
            str(r["patch_size"]),
            str(r["scales"]),
            "/".join(map(str, r["strides"])),
            r["head"],
            f"{r['params'] / 1e6:.2f}",
            f"{r['step_s']:.3f}",
            f"{r['saved_for_backward_mb']:.1f}",
            f"{r.get('peak_allocated_mb', r.get('peak_rss_mb')):.0f}",
        ]
        for r in results
    ]

    def ratio(key):
        return exp[key] / base[key] if base[key] else float("nan")

    rows.append(
        [
            "ratio exp/base",
            "",
            "",
            "",
            "",
            f"{ratio('params'):.2f}x",
            f"{ratio('step_s'):.2f}x",
            f"{ratio('saved_for_backward_mb'):.2f}x",
            f"{ratio('peak_allocated_mb' if 'peak_allocated_mb' in base else 'peak_rss_mb'):.2f}x",
        ]
    )
    print_table(cols, rows)
    print(
        f"activation memory (saved for backward) ratio: {ratio('saved_for_backward_mb'):.2f}x; "
        f"step time ratio: {ratio('step_s'):.2f}x"
    )
    if args.json:
        from rat_plugins.utils.atomic import atomic_write_json

        atomic_write_json(
            args.json,
            dict(size=args.size, clip_len=args.clip_len, batch=args.batch, embed=args.embed, results=results),
            indent=1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
