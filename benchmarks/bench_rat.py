"""CPU benchmark of RAT's spatial grouping attention: the package's dense layer vs the local one.

    .venv/bin/python benchmarks/bench_rat.py [--quick] [--threads 1] [--sizes 64 128 256 512 1024]

1. One grouping layer (feature_dims 128, 16 heads, kernel 7, stride 3, 3 iterations: the
   package's defaults, 2D, batch 1) at each size: ``DenseSpatialGroupingAttention`` (the package)
   next to ``LocalSpatialGroupingAttention`` (rat_plugins, default window = the 7x7 strider
   kernel), forward under ``torch.no_grad``. The dense layer runs only where its estimated peak
   (5 (heads x groups x pixels) float32 matrices) fits ``--dense-max-gb``.
2. A 2-block, 128-dim ``RATBackbone`` (the package's model; package-default grouping kernel 7 and
   stride 3, ``attention='local'``) forward on a 3-channel ``--rat-size`` image.

Each case runs in its own subprocess, so its memory is its own: "peak RSS" is the process's
``VmHWM`` (everything: Python, torch, weights, input), "added" is that peak minus the RSS just
before the timed forward (what the forward itself needed). Times: median over repeats (one run,
no warm-up, above 64x64).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from _timing import add_threads_argument, load_note, median_time, peak_rss_mb, rss_mb, set_threads, threads_argv  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LAYER = dict(feature_dims=128, num_heads=16, spatial_dims=2, kernel_size=7, iters=3)
GB = 1024**3
MIB = 1024**2


def current_rss_bytes():
    return rss_mb() * MIB


def peak_rss_bytes():
    return peak_rss_mb() * MIB


def groups_along(size, kernel=7, stride=3):
    return (size + 2 * ((kernel - 1) // 2) - kernel) // stride + 1


def dense_estimate_gb(size):
    matrix = 4 * LAYER["num_heads"] * groups_along(size) ** 2 * size * size
    return 5 * matrix / GB


def run_layer_case(impl, size, repeats, warmup):
    from spatial_grouping_attention import DenseSpatialGroupingAttention

    from rat_plugins.models.rat_attention import LocalSpatialGroupingAttention

    torch.manual_seed(0)
    cls = DenseSpatialGroupingAttention if impl == "dense" else LocalSpatialGroupingAttention
    layer = cls(**LAYER).eval()
    x = torch.randn(1, size * size, LAYER["feature_dims"])
    with torch.no_grad():
        baseline = current_rss_bytes()
        seconds = median_time(lambda: layer(x, (1.0, 1.0), (size, size)), repeats, warmup)
    return dict(seconds=seconds, peak=peak_rss_bytes(), added=peak_rss_bytes() - baseline)


def run_rat_case(size, repeats, warmup):
    from rat_plugins.models.rat_backbone import RATBackbone

    torch.manual_seed(0)
    model = RATBackbone(
        spatial_dims=2,
        input_features=3,
        feature_dims=128,
        num_blocks=2,
        num_heads=16,
        iters=3,
        sga_kernel_size=7,
        stride=3,
        attention="local",
    ).eval()
    spent = {"grouping": 0.0, "multi-res attention": 0.0}

    def clock(kind):
        def pre(module, args):
            module._bench_t0 = time.perf_counter()

        def post(module, args, out):
            spent[kind] += time.perf_counter() - module._bench_t0

        return pre, post

    for kind, layers in (("grouping", model.sga_layers), ("multi-res attention", model.mr_attn_layers)):
        for layer in layers:
            pre, post = clock(kind)
            layer.register_forward_pre_hook(pre)
            layer.register_forward_hook(post)
    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        baseline = current_rss_bytes()
        seconds = median_time(lambda: model(image), repeats, warmup)
    runs = repeats + warmup
    return dict(
        seconds=seconds,
        peak=peak_rss_bytes(),
        added=peak_rss_bytes() - baseline,
        grouping=spent["grouping"] / runs,
        mr_attn=spent["multi-res attention"] / runs,
        tokens=[groups_along(size) ** 2, groups_along(groups_along(size)) ** 2],
    )


def child(args):
    set_threads(args.threads)
    if args.case == "rat":
        result = run_rat_case(args.size, args.repeats, args.warmup)
    else:
        result = run_layer_case(args.case, args.size, args.repeats, args.warmup)
    print("RESULT " + json.dumps(result))


def spawn(case, size, repeats, warmup, threads):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--case",
        case,
        "--size",
        str(size),
        "--repeats",
        str(repeats),
        "--warmup",
        str(warmup),
        *threads_argv(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"error": tail[0][:80]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    add_threads_argument(parser)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument(
        "--dense-max-gb",
        type=float,
        default=12.0,
        help="run the dense layer only where its estimated peak is below this",
    )
    parser.add_argument("--rat-size", type=int, default=1024, help="image size of the RAT forward (0: skip)")
    # one case, run by the parent in a subprocess
    parser.add_argument("--case", choices=["dense", "local", "rat"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return child(args)

    print(f"torch {torch.__version__}, {set_threads(args.threads)} threads")
    print(load_note())

    print(
        f"\n== one grouping layer: dim {LAYER['feature_dims']}, {LAYER['num_heads']} heads, kernel 7, stride 3, "
        f"{LAYER['iters']} iterations, batch 1, forward (no grad) =="
    )
    print(
        f"{'input':>9} {'groups':>7} {'dense s':>9} {'local s':>9} {'speed-up':>9} "
        f"{'dense added GB':>15} {'local added GB':>15} {'mem ratio':>10} {'dense peak GB':>14} "
        f"{'local peak GB':>14}"
    )
    for size in args.sizes:
        repeats, warmup = (3, 1) if size <= 64 and not args.quick else (1, 0)  # larger: seconds per run
        dense_est = dense_estimate_gb(size)
        if dense_est <= args.dense_max_gb:
            dense = spawn("dense", size, repeats, warmup, args.threads)
        else:
            dense = {"error": f"est. {dense_est:.0f} GB"}
        local = spawn("local", size, repeats, warmup, args.threads)

        def cell(result, key, scale=1.0, width=9, digits=2):
            if "error" in result:
                return f"{'-':>{width}}"
            return f"{result[key] / scale:{width}.{digits}f}"

        both = "error" not in dense and "error" not in local
        speed = f"{dense['seconds'] / local['seconds']:8.1f}x" if both else f"{'-':>9}"
        ratio = f"{dense['added'] / local['added']:9.1f}x" if both else f"{'-':>10}"
        print(
            f"{f'{size}x{size}':>9} {groups_along(size) ** 2:>7} {cell(dense, 'seconds')} "
            f"{cell(local, 'seconds')} {speed} {cell(dense, 'added', GB, 15, 3)} "
            f"{cell(local, 'added', GB, 15, 3)} {ratio} {cell(dense, 'peak', GB, 14, 3)} "
            f"{cell(local, 'peak', GB, 14, 3)}"
            + (f"   dense not run: {dense['error']}" if "error" in dense else "")
            + (f"   local failed: {local['error']}" if "error" in local else "")
        )

    if args.rat_size:
        size = args.rat_size
        print(
            f"\n== RATBackbone, 2 blocks, dim 128, 16 heads, grouping kernel 7 / stride 3, "
            f"local grouping attention, {size}x{size}x3 input, batch 1, forward (no grad) =="
        )
        rat = spawn("rat", size, 1, 0, args.threads)
        if "error" in rat:
            print(f"failed: {rat['error']}")
        else:
            print(
                f"time {rat['seconds']:.1f} s (grouping layers {rat['grouping']:.1f} s, multi-res attention "
                f"{rat['mr_attn']:.1f} s over {rat['tokens'][0]} + {rat['tokens'][1]} tokens); "
                f"peak RSS {rat['peak'] / GB:.2f} GB (forward added {rat['added'] / GB:.2f} GB); "
                f"target 8 GB: {'met' if rat['peak'] < 8 * GB else 'NOT met'}"
            )


if __name__ == "__main__":
    main()
