#!/usr/bin/env python
"""Wall time of the OFAT baseline for 2 epochs with and without the frozen-feature cache.

Three runs of tools/lazyconfig_train_net.py, side by side, on the synthetic head sample:

* ``off``  — cache disabled (``model.backbone.net.feature_cache_dir=""``);
* ``cold`` — empty cache: epoch 1 fills it, epoch 2 hits the views seen before (flips differ);
* ``warm`` — the cache left by ``cold``, as the next run of a sweep sees it (same seed, so the
  random backbone is the same; with a checkpoint the weights are the same anyway).

Each run is a separate process; the table gives the training time from detectron2's log
("Overall training speed" line: iterations and seconds) and the whole process wall time, with
ratios to ``off``. Usage::

    python benchmarks/bench_feature_cache.py [--image-size 256] [--images 48] [--threads 2]

The RoI stage is the quick mode's (32 RoIs per image, 64-wide box-head convolutions).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _timing import add_threads_argument

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "projects/ViTDet/configs/OFAT/baseline_lr0.001_bs8_adamw_ep100.py"
SPEED = re.compile(r"Overall training speed: (\d+) iterations in (\S+) \((\S+) s / it\)")


def run(name, data, cache, out, args):
    # the quick mode's CPU-sized RoI stage, so that the backbone's share is visible on a CPU
    overrides = [
        f"dataloader.image_size={args.image_size}",
        "model.backbone.net.checkpoint=",
        "model.roi_heads.batch_size_per_image=32",
        "model.proposal_generator.post_nms_topk=[200,50]",
        *[f"model.roi_heads.box_heads.{i}.conv_dims=[64,64,64,64]" for i in range(3)],
        f"model.backbone.net.feature_cache_dir={cache}",
        "train.seed=0",
        "train.epochs=2",
        "train.warmup_iters=2",
        "train.device=cpu",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "dataloader.final_test.num_workers=0",
        f"train.output_dir={out / name}",
    ]
    env = dict(os.environ, RAT_DATASETS=str(data), OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/lazyconfig_train_net.py"), "--config-file", str(CONFIG), *overrides],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"run {name} failed:\n{proc.stderr[-3000:]}")
    match = SPEED.search(proc.stdout + proc.stderr)
    per_iter = float(match.group(3)) if match else float("nan")
    return wall, per_iter


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--images", type=int, default=48, help="train images of the synthetic sample")
    add_threads_argument(p, default=2)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from rat_plugins.data.synthetic import make_heads

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_heads(tmp / "data" / "coco", n=args.images, size=args.image_size)
        cache = tmp / "cache"
        rows = [
            ("off", *run("off", tmp / "data", "", tmp, args)),
            ("cold", *run("cold", tmp / "data", cache, tmp, args)),
            ("warm", *run("warm", tmp / "data", cache, tmp, args)),
        ]
        entries = sum(1 for f in cache.rglob("*.pt"))
        size_mb = sum(f.stat().st_size for f in cache.rglob("*.pt")) / 2**20
    base_wall, base_iter = rows[0][1], rows[0][2]
    print(
        f"OFAT baseline (quick-mode RoI stage), 2 epochs, {args.images} train images at {args.image_size}px, "
        f"{args.threads} threads, ViM-tiny frozen (random weights)"
    )
    print(f"{'cache':<6} {'wall s':>8} {'x off':>6} {'s / iter':>9} {'x off':>6}")
    for name, wall, per_iter in rows:
        print(f"{name:<6} {wall:8.1f} {wall / base_wall:6.2f} {per_iter:9.3f} {per_iter / base_iter:6.2f}")
    print(f"cache: {entries} entries, {size_mb:.1f} MiB")
    print(f"step time saved with a warm cache: {100 * (1 - rows[2][2] / base_iter):.0f} %")


if __name__ == "__main__":
    main()
