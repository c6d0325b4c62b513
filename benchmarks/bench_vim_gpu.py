"""GPU benchmark of the selective scan and of ViM-tiny: Triton vs the PyTorch scan (vs mamba-ssm).

    python benchmarks/bench_vim_gpu.py [--quick] [--batches 1 8 32] [--sizes 224 640] [--dtypes bf16 fp32]

Needs torch and triton (and timm, a dependency of the package, for ViM-tiny); imports only
``rat_plugins.models.ops`` and ``rat_plugins.models.vim``, never mmcv or detectron2. Without a
CUDA device it exits with one line (code 2).

1. The scan of one ViM-tiny layer (both directions: inner width 384 each, d_state 16, delta
   softplus + bias, D, z gate) at L = 197 (224x224 with the cls token) and 1601 (640x640):
   ``triton`` is the fused bimamba kernel ViM runs (both directions in one launch), ``torch`` and
   ``mamba_ssm`` the unfused call ViM makes with those backends (one scan, two groups of B / C).
   Forward (no autograd) and backward (``loss.backward()`` alone).
2. ViM-tiny (``vim_tiny``, 24 layers) forward (inference) and forward + backward (training) per
   backend at 224 and 640.
3. The bound, measured in the same run: the bytes the scan must move (read u, delta, z, B, C and
   write y; backward: read those and the output gradient, write the gradients of u, delta, z, B,
   C) divided by this GPU's copy bandwidth (a large ``Tensor.copy_``). "x of bound" = time / bound
   (1.0 = as fast as memory allows); "speed-up vs torch" = torch time / time.
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import print_table  # noqa: E402

from rat_plugins.models.ops import selective_scan as ss  # noqa: E402

DIM, STATE = 384, 16  # ViM-tiny: d_inner per direction, d_state
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def gpu_time(fn, repeats, warmup=2):
    """Median milliseconds of ``fn()`` on the current CUDA stream (events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(repeats):
    """Bytes per ms a device-to-device ``copy_`` of 1 GiB moves (read + write)."""
    src = torch.empty(2**28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = gpu_time(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / ms


def scan_inputs(batch, L, dtype, seed=0, device="cuda"):
    """One layer's two directions: [2, ...] tensors (direction 1 in the original token order)."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    return dict(
        u=(r(2, batch, DIM, L)).to(dtype),
        delta=(r(2, batch, DIM, L) * 0.5 - 1).to(dtype),
        A=-torch.exp(r(2, DIM, STATE) * 0.5),
        B=r(2, batch, STATE, L).to(dtype),
        C=r(2, batch, STATE, L).to(dtype),
        D=r(2, DIM),
        z=r(batch, DIM, L).to(dtype),
        delta_bias=r(2, DIM) * 0.3,
    )


def scan_call(backend, x):
    """The scan ViM makes for one layer with ``backend``; returns a function of the inputs."""
    if backend == "triton":
        from rat_plugins.models.ops.triton_scan import bimamba_scan_triton

        def fused(x):
            return bimamba_scan_triton(
                (x["u"][0], x["u"][1]),
                (x["delta"][0], x["delta"][1]),
                x["A"],
                (x["B"][0], x["B"][1]),
                (x["C"][0], x["C"][1]),
                x["D"],
                x["delta_bias"],
                x["z"],
                scale=0.5,
            )

        return fused

    def unfused(x):  # ViM's unfused layout: channels of both directions stacked, B / C as two groups
        b, L = x["u"].shape[1], x["u"].shape[3]
        y = ss.selective_scan(
            x["u"].transpose(0, 1).reshape(b, 2 * DIM, L),
            x["delta"].transpose(0, 1).reshape(b, 2 * DIM, L),
            x["A"].reshape(2 * DIM, STATE),
            x["B"].transpose(0, 1),
            x["C"].transpose(0, 1),
            D=x["D"].reshape(-1),
            z=torch.cat([x["z"], x["z"].flip(-1)], 1),
            delta_bias=x["delta_bias"].reshape(-1),
            delta_softplus=True,
            backend=backend,
        )
        y_f, y_b = y.chunk(2, dim=1)
        return (y_f + y_b.flip(-1)) * 0.5

    return unfused


def scan_bytes(batch, L, dtype, backward):
    """What the scan must read and write at least, in bytes."""
    e = torch.finfo(dtype).bits // 8
    per_dir = batch * DIM * L * e * 2 + 2 * batch * STATE * L * e  # u, delta; B, C
    fwd = 2 * per_dir + batch * DIM * L * e * 2  # + z read once, y written once
    return 2 * fwd + batch * DIM * L * e if backward else fwd  # backward: inputs + gout, their grads


def time_scan(backend, batch, L, dtype, repeats):
    x = scan_inputs(batch, L, dtype)
    fn = scan_call(backend, x)
    with torch.no_grad():
        fwd = gpu_time(lambda: fn(x), repeats)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    w = torch.randn(batch, DIM, L, device="cuda", dtype=dtype)
    bwd = []
    for i in range(repeats + 2):
        y = fn(leaves)
        loss = (y * w).sum()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss.backward()
        end.record()
        end.synchronize()
        if i >= 2:
            bwd.append(start.elapsed_time(end))
        for v in leaves.values():
            v.grad = None
    return fwd, statistics.median(bwd)


def time_vim(backend, size, batch, dtype, repeats):
    from rat_plugins.models.vim import vim_tiny

    os.environ[ss.BACKEND_ENV] = backend
    model = vim_tiny(img_size=size).cuda()
    img = torch.randn(batch, 3, size, size, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def infer():
        with torch.inference_mode(), autocast:
            model.eval()(img)

    def train():
        with autocast:
            loss = model.train()(img).float().mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return gpu_time(infer, repeats), gpu_time(train, max(1, repeats // 2), warmup=1)


def guarded(fn, *args):
    """``fn(*args)``, or None when the GPU runs out of memory (the torch scan at large shapes)."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def fmt(ms, ref=None, bound=None):
    if ms is None:
        return ["out of memory", "-", "-"]
    return [f"{ms:.3f}", f"{ms / bound:.2f}" if bound else "-", f"{ref / ms:.1f}x" if ref else "-"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 640])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--no-model", action="store_true", help="only the scan")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_vim_gpu.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine",
            file=sys.stderr,
        )
        return 2
    from rat_plugins.models.ops.triton_scan import triton_problem

    problem = triton_problem(torch.device("cuda"))
    if problem is not None:
        print(f"bench_vim_gpu.py: the Triton scan cannot run: {problem}", file=sys.stderr)
        return 2
    repeats = 3 if args.quick else 10
    backends = ["triton", "torch"] + (["mamba_ssm"] if ss._mamba_selective_scan_fn() is not None else [])
    bandwidth = copy_bandwidth(repeats)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; backends: {', '.join(backends)}")
    print(f"measured copy bandwidth: {bandwidth / 1e6:.0f} GB/s (bound = scan bytes / this)")

    cols = ["what", "input", "batch", "dtype", "pass", "backend", "ms", "x of bound", "speed-up vs torch"]
    rows = []
    for size in args.sizes:
        L = (size // 16) ** 2 + 1
        for batch in args.batches:
            for dname in args.dtypes:
                dtype = DTYPES[dname]
                scan = {b: guarded(time_scan, b, batch, L, dtype, repeats) for b in backends}
                for i, pass_ in enumerate(("forward", "backward")):
                    bound = scan_bytes(batch, L, dtype, pass_ == "backward") / bandwidth
                    ref = scan["torch"][i] if scan["torch"] else None
                    for b in backends:
                        ms = scan[b][i] if scan[b] else None
                        rows.append(["scan", f"L={L}", str(batch), dname, pass_, b, *fmt(ms, ref, bound)])
                if args.no_model:
                    continue
                model = {b: guarded(time_vim, b, size, batch, dtype, repeats) for b in backends}
                for i, pass_ in enumerate(("inference", "train step")):
                    ref = model["torch"][i] if model["torch"] else None
                    for b in backends:
                        ms = model[b][i] if model[b] else None
                        rows.append(["ViM-tiny", f"{size}x{size}", str(batch), dname, pass_, b, *fmt(ms, ref)])
                print(f"done: {size}x{size}, batch {batch}, {dname}", file=sys.stderr)
    print()
    print_table(cols, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
