"""Time and memory of the RAT study's shipped models on CPU, batch 1 (mmseg models from the configs).

    .venv/bin/python benchmarks/bench_rat_memory.py [--threads 2] [--sizes 128 256 512 1024]
        [--configs rat_isic_single_256 ...] [--ablations attn_dense attn_mha] [--train-size 256]

1. Test forward (no grad) of each segmentation config (backbone and UPerHead, random weights) at
   each size: seconds, the tensors it held at its peak (``LiveTensorBytes``), what the robustness
   tool's estimate (``estimate_eval_memory_gb``: measured at 128 and 256, scaled by pixels) said
   beforehand, and the process's peak RSS growth (allocator slack, libraries' first use included).
2. One training step (forward, backward; batch norm on its running statistics, as batch 1 needs)
   of each ablation config at ``--train-size``: seconds and peak RSS growth. The study's budget:
   16 GB per process at 256x256, batch 1.

Each case runs in its own subprocess, so its memory is its own.
"""

import argparse
import json
import os
import sys
import time

from _timing import (  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
    add_threads_argument,
    load_note,
    peak_rss_mb,
    print_table,
    rss_mb,
    run_child,
    set_threads,
    threads_argv,
)

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
CONFIGS = os.path.join(REPO, "projects", "RAT", "configs")
SEGMENTATION = ["rat_isic_single_256", "rat_isic_dual_256-128", "rat_isic_triple_256-128-64"]
TRAIN_BUDGET_GB = 16.0


def _model(config_path):
    from mmengine.config import Config

    import rat_plugins.mm  # noqa: F401  (registers the plugin's components)
    from rat_plugins.experiments.robustness import build_segmentor

    cfg = Config.fromfile(config_path)
    return cfg, build_segmentor(cfg.model)


def eval_case(config_path, size):
    import torch

    from rat_plugins.experiments.robustness import estimate_eval_memory_gb
    from rat_plugins.utils.live_memory import LiveTensorBytes

    cfg, model = _model(config_path)
    estimate = estimate_eval_memory_gb(cfg.model, size)
    model.eval()
    image = torch.randn(1, 3, size, size)
    before = rss_mb()
    start = time.perf_counter()
    with torch.no_grad(), LiveTensorBytes() as memory:
        model(image, mode="tensor")
    seconds = time.perf_counter() - start
    added_gb = (peak_rss_mb() - before) / 1024
    return dict(seconds=seconds, live_gb=memory.peak / 1e9, estimate_gb=estimate, rss_added_gb=added_gb)


def train_case(config_path, size):
    import torch

    _, model = _model(config_path)
    model.train()
    for module in model.modules():  # batch 1: batch norm uses its running statistics
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    image = torch.randn(1, 3, size, size)
    before = rss_mb()
    start = time.perf_counter()
    features = model.extract_feat(image)
    logits = model.decode_head(features)
    logits.float().square().mean().backward()
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, rss_added_gb=(peak_rss_mb() - before) / 1024)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_threads_argument(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--configs", nargs="*", default=SEGMENTATION, help="segmentation config names")
    parser.add_argument("--ablations", nargs="*", default=["attn_dense", "attn_mha"], help="ablation config names")
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--case", choices=["eval", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        set_threads(args.threads)
        result = (eval_case if args.case == "eval" else train_case)(args.config, args.size)
        print("RESULT " + json.dumps(result))
        return 0

    print(f"{set_threads(args.threads)} threads; {load_note()}")

    def spawn(case, path, size):
        cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--config", path, "--size", str(size)]
        return run_child(cmd + threads_argv(args.threads), f"{case} {os.path.basename(path)} {size}")

    rows = []
    for name in args.configs:
        for size in args.sizes:
            r = spawn("eval", os.path.join(CONFIGS, f"{name}.py"), size)
            if r is None:
                rows.append([name, str(size), "failed", "", "", "", ""])
                continue
            rows.append(
                [
                    name,
                    str(size),
                    f"{r['seconds']:.1f}",
                    f"{r['live_gb']:.3f}",
                    f"{r['estimate_gb']:.3f}",
                    f"{r['estimate_gb'] / r['live_gb']:.2f}",
                    f"{r['rss_added_gb']:.3f}",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    if rows:
        print("\n== test forward, batch 1, no grad ==")
        print_table(
            ["config", "size", "seconds", "tensors GB", "estimate GB", "estimate / tensors", "RSS added GB"], rows
        )

    rows = []
    for name in args.ablations:
        r = spawn("train", os.path.join(CONFIGS, "ablations", f"{name}.py"), args.train_size)
        if r is None:
            rows.append([name, "failed", "", ""])
            continue
        fits = "yes" if r["rss_added_gb"] <= TRAIN_BUDGET_GB else "NO"
        rows.append([name, f"{r['seconds']:.1f}", f"{r['rss_added_gb']:.2f}", fits])
    if rows:
        print(f"\n== one training step (forward + backward) at {args.train_size}x{args.train_size}, batch 1 ==")
        print_table(["ablation", "seconds", "RSS added GB", f"within {TRAIN_BUDGET_GB:g} GB"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
