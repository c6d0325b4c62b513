#!/usr/bin/env python
"""SETR-MLA training step with the encoder frozen vs trainable: step time and memory, side by side.

A third mode, ``frozen-cached``, repeats one batch with the frozen-feature cache on
(``model.backbone.feature_cache_dir``): the warm-up step fills the cache, the timed steps read the
encoder's four MLA layers from disk, as validation does from the second evaluation on.

    python benchmarks/bench_setr.py [--config CONFIG] [--size 224] [--batch 2] [--steps 3]
        [--warmup 1] [--device cpu|cuda] [--threads N] [--cfg-options k=v ...] [--json OUT]

Both modes use the same config, batch and input (random images and labels; no data or weights
needed: ``pretrained_timm`` is set to None) and each runs in its own fresh process, so the memory
figures do not mix. One step = data preprocessing + forward + loss + backward + AdamW update
(``model.train_step`` with the config's optimizer wrapper, as the training loop runs it).

Reported per mode: median step time; on CUDA the peak allocated memory
(``torch.cuda.max_memory_allocated``); on CPU the process's peak resident memory and its growth
since the model was built (warm-up and timed steps), plus exact counts: bytes autograd saves for
backward in one step, gradient bytes, and AdamW state bytes.
"""

import argparse
import json
import os
import statistics
import sys
import time

from _timing import (
    SavedForBackward,
    add_threads_argument,
    peak_rss_mb,
    print_table,
    rss_mb,
    run_child,
    set_threads,
    threads_argv,
)

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("frozen", "frozen-cached", "trainable")
DEFAULT_CONFIG = os.path.join(HERE, "..", "projects", "SETR", "configs", "setr_vit-b16_mla_frozen_fundus.py")


def _parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--size", type=int, default=224, help="square input size")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    add_threads_argument(p)
    p.add_argument("--cfg-options", nargs="+", default=[], help="extra key=value overrides")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return p


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _child(args):
    import torch
    from mmengine.config import Config, DictAction
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    import rat_plugins.mm  # noqa: F401

    set_threads(args.threads)
    cfg = Config.fromfile(args.config)
    size = (args.size, args.size)
    opts = {
        "model.backbone.frozen": args.child != "trainable",
        "model.backbone.pretrained_timm": None,
        "model.backbone.img_size": size,
        "model.data_preprocessor.size": size,
    }
    if args.child == "frozen-cached":
        import tempfile

        opts["model.backbone.feature_cache_dir"] = tempfile.mkdtemp(prefix="setr-feature-cache-")
    if args.cfg_options:
        action = DictAction(option_strings=[], dest="o")
        ns = argparse.Namespace()
        action(None, ns, args.cfg_options)
        opts.update(ns.o)
    cfg.merge_from_dict(opts)
    DefaultScope.get_instance(f"bench-{time.time()}", scope_name=cfg.get("default_scope", "mmseg"))
    from mmseg.registry import MODELS

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.to(device).train()
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    g = torch.Generator().manual_seed(0)
    num_classes = cfg.model.decode_head.num_classes

    def batch():
        inputs = [torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8) for _ in range(args.batch)]
        samples = []
        for _ in range(args.batch):
            s = SegDataSample()
            s.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, *size), generator=g))
            s.set_metainfo(dict(img_shape=size, ori_shape=size, pad_shape=size))
            samples.append(s)
        return dict(inputs=inputs, data_samples=samples)

    if args.child == "frozen-cached":  # the same view again: every timed step is a cache hit
        data = [batch()] * (args.warmup + args.steps)
    else:
        data = [batch() for _ in range(args.warmup + args.steps)]
    saved = SavedForBackward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rss_before = rss_mb()  # model and data built, nothing trained yet
    for d in data[: args.warmup]:
        model.train_step(d, optim)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i, d in enumerate(data[args.warmup :]):
        sync()
        start = time.perf_counter()
        if i == 0:
            with saved.hooks():
                losses = model.train_step(d, optim)
        else:
            losses = model.train_step(d, optim)
        sync()
        times.append(time.perf_counter() - start)
    # gradients exist between backward and zero_grad (set to None after each step): one per trainable value
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state_bytes = sum(
        v.numel() * v.element_size() for st in optim.optimizer.state.values() for v in st.values() if torch.is_tensor(v)
    )
    bb_total = sum(p.numel() for p in model.backbone.parameters())
    result = dict(
        mode=args.child,
        device=str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        threads=torch.get_num_threads(),
        step_s=statistics.median(times),
        step_times_s=times,
        loss=float(sum(v for k, v in losses.items() if "loss" in k)),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        backbone_params=bb_total,
        saved_for_backward_mb=saved.mb,
        grads_mb=grad_bytes / 2**20,
        optimizer_state_mb=state_bytes / 2**20,
    )
    if device.type == "cuda":
        result["peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["rss_before_steps_mb"] = rss_before
        result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result))
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.child:
        return _child(args)
    results = []
    for mode in MODES:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--config",
            args.config,
            "--size",
            str(args.size),
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
            *threads_argv(args.threads),
        ]
        if args.cfg_options:
            cmd += ["--cfg-options", *args.cfg_options]
        result = run_child(cmd, mode)
        if result is None:
            return 1
        results.append(result)
    r0 = results[0]
    print(
        f"SETR-MLA train step, {os.path.basename(args.config)}, input {args.batch}x3x{args.size}x{args.size}, "
        f"{r0['device']} ({r0['threads']} threads), median of {args.steps} steps after {args.warmup} warm-up"
    )
    cols = ["mode", "step s", "trainable", "saved for bwd MB", "grads MB", "AdamW state MB"]
    cols += ["peak alloc MB"] if "peak_allocated_mb" in r0 else ["peak RSS MB", "RSS growth MB"]
    rows = []
    for r in results:
        row = [
            r["mode"],
            f"{r['step_s']:.3f}",
            f"{r['trainable_params'] / 1e6:.2f} M",
            f"{r['saved_for_backward_mb']:.1f}",
            f"{r['grads_mb']:.1f}",
            f"{r['optimizer_state_mb']:.1f}",
        ]
        if "peak_allocated_mb" in r:
            row.append(f"{r['peak_allocated_mb']:.1f}")
        else:
            row += [f"{r['peak_rss_mb']:.0f}", f"{r['peak_rss_mb'] - r['rss_before_steps_mb']:.0f}"]
        rows.append(row)
    print_table(cols, rows)
    by_mode = {r["mode"]: r for r in results}
    fr, fc, tr = by_mode["frozen"], by_mode["frozen-cached"], by_mode["trainable"]
    print(
        f"frozen / trainable step time: {fr['step_s'] / tr['step_s']:.2f}; "
        f"frozen with cache hits / frozen: {fc['step_s'] / fr['step_s']:.2f}"
    )
    if args.json:
        from rat_plugins.utils.atomic import atomic_write_json

        atomic_write_json(
            args.json, dict(config=args.config, size=args.size, batch=args.batch, results=results), indent=1
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
