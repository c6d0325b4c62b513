"""CPU benchmark of the selective scan and of ViM-tiny, everything measured in one run.

    .venv/bin/python benchmarks/bench_vim.py [--quick]

1. Selective scan (batch 1, dim 384, state 16, delta softplus + bias, D, z gate, as one ViM
   direction): a plain sequential reference (one time step per PyTorch op group) vs the
   project's ``selective_scan`` (the backend chosen for CPU tensors, plus the pure-PyTorch
   fallback), forward (``torch.inference_mode``) and backward (``loss.backward()`` alone), at
   L = 196 and 1600. Medians over a few repeats.
2. ViM-tiny (``vim_tiny``, 24 layers, embed 192) forward under ``torch.inference_mode`` at
   224x224 (L = 197 tokens) and 640x640 (L = 1601), batch 1 and 2: the fused mixer path (what a
   frozen backbone runs) and, side by side, the unfused one (``use_fast_path=False``).
3. Achieved GFLOP/s of those forwards against this machine's own lower bound, measured in the
   same run:  bound = model FLOPs / (fp32 matmul FLOP/s) + scan exponentials / (torch.exp per s).

FLOPs are counted analytically (multiply and add = 2 FLOPs), per image, for L tokens, embed C,
inner width di = 2C, state N, dt rank R, conv kernel K, patch p:
  patch embed 2*M*C*3p^2; per layer: in_proj 2*L*C*2di, two causal convs 2*2*L*di*K, two x_proj
  2*2*L*di*(R+2N), two dt_proj 2*2*L*R*di, out_proj 2*L*di*C, two scans 2*L*di*N*6 (delta*A,
  decay*state, delta*u*B, add, C*state, accumulate) + 2*L*di*8 (softplus input, D skip, gate),
  RMSNorm 4*L*C; final norm 4*L*C; head 2*C*classes. Exponentials: 2 directions * L * di * N
  per layer (exp(delta*A)); the softplus / silu exponentials (O(L*di)) are left out.
"""

import argparse
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _timing import add_threads_argument, load_note, median_time, set_threads

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rat_plugins.models.ops.selective_scan import backend_for, selective_scan  # noqa: E402
from rat_plugins.models.vim import vim_tiny  # noqa: E402


def reference_scan(u, delta, A, B, C, D, z, delta_bias):
    """Sequential reference: one time step at a time (softplus delta, D skip, z gate)."""
    delta = F.softplus(delta + delta_bias[:, None])
    s = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        s = torch.exp(delta[:, :, t, None] * A) * s + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        ys.append((s * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, -1) + D[:, None] * u) * F.silu(z)


def scan_inputs(L, dim=384, state=16, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(
        u=r(batch, dim, L),
        delta=r(batch, dim, L) * 0.5 - 1,
        A=-torch.exp(r(dim, state) * 0.5),
        B=r(batch, state, L),
        C=r(batch, state, L),
        D=r(dim),
        z=r(batch, dim, L),
        delta_bias=r(dim) * 0.3,
    )


def project_scan(backend):
    def fn(u, delta, A, B, C, D, z, delta_bias):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True, backend=backend)

    return fn


def time_forward_backward(fn, x, repeats, warmup=1):
    with torch.inference_mode():
        t_fwd = median_time(lambda: fn(**x), repeats, warmup)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    w = torch.randn_like(x["u"])
    bwd = []
    for i in range(repeats + warmup):
        y = fn(**leaves)
        loss = (y * w).sum()
        t0 = time.perf_counter()
        loss.backward()
        if i >= warmup:
            bwd.append(time.perf_counter() - t0)
        for v in leaves.values():
            v.grad = None
    return t_fwd, statistics.median(bwd)


def vim_flops_and_exps(model, img):
    C = model.embed_dim
    p = model.patch_embed.patch_size[0]
    M = model.patch_embed.num_patches
    L = M + model.num_tokens
    mixer = model.layers[0].mixer
    di, N, R, K = mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.d_conv
    per_layer = (
        2 * L * C * 2 * di
        + 2 * 2 * L * di * K
        + 2 * 2 * L * di * (R + 2 * N)
        + 2 * 2 * L * R * di
        + 2 * L * di * C
        + 2 * L * di * N * 6
        + 2 * L * di * 8
        + 4 * L * C
    )
    n_layers = len(model.layers)
    classes = model.head.out_features if hasattr(model.head, "out_features") else 0
    flops = 2 * M * C * 3 * p * p + n_layers * per_layer + 4 * L * C + 2 * C * classes
    exps = n_layers * 2 * L * di * N
    return flops, exps, L


def machine_rates(repeats):
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    out = torch.empty(1024, 1024)
    with torch.inference_mode():
        t_mm = median_time(lambda: torch.mm(a, b, out=out), repeats * 3)
        x = torch.randn(384 * 2 * 16 * 128)  # one block of the scan's exponentials (fits the cache)
        y = torch.empty_like(x)
        t_exp = median_time(lambda: torch.exp(x, out=y), repeats * 5)
    return 2 * 1024**3 / t_mm, x.numel() / t_exp


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    add_threads_argument(parser)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    rep = 2 if args.quick else 5
    torch.manual_seed(0)
    cpu_backend = backend_for(torch.zeros(1))
    print(f"torch {torch.__version__}, {threads} threads, selective-scan backend for CPU tensors: {cpu_backend}")
    print(load_note())

    print("\n== selective scan: batch 1, dim 384, state 16 (softplus delta + bias, D, z) ==")
    print(
        f"{'L':>5} {'pass':>8} {'reference ms':>13} {cpu_backend + ' ms':>10} {'speed-up':>9} "
        f"{'torch-fallback ms':>18} {'speed-up':>9}"
    )
    for L in (196, 1600):
        x = scan_inputs(L)
        # the slow paths get fewer repeats (no warm-up at L=1600: nothing to warm up in a loop)
        ref_rep, ref_warm = (max(1, rep // 2), 1) if L < 1000 else (1, 0)
        ref_f, ref_b = time_forward_backward(reference_scan, x, ref_rep, ref_warm)
        prj_f, prj_b = time_forward_backward(project_scan(cpu_backend), x, rep)
        tor_f, tor_b = time_forward_backward(project_scan("torch"), x, ref_rep, ref_warm)
        for name, r, p, t in (("forward", ref_f, prj_f, tor_f), ("backward", ref_b, prj_b, tor_b)):
            print(f"{L:>5} {name:>8} {r * 1e3:13.2f} {p * 1e3:10.2f} {r / p:8.1f}x {t * 1e3:18.2f} {r / t:8.1f}x")

    mm_rate, exp_rate = machine_rates(rep)
    print(
        f"\n== machine (measured now): fp32 matmul 1024^3 {mm_rate / 1e9:.1f} GFLOP/s, "
        f"torch.exp {exp_rate / 1e9:.2f} G/s =="
    )

    print("\n== ViM-tiny forward (torch.inference_mode) ==")
    print(
        "(ms: the fused mixer path; unfused ms: use_fast_path=False, the scan op plus PyTorch ops; "
        "actual/bound <= 2 meets the target)"
    )
    print(
        f"{'input':>9} {'batch':>5} {'tokens':>6} {'ms':>9} {'unfused ms':>10} {'GFLOP':>7} {'exp (M)':>8} "
        f"{'GFLOP/s':>8} {'bound ms':>9} {'actual/bound':>12}"
    )
    for size in (224, 640):
        model = vim_tiny(img_size=size).eval()
        for batch in (1, 2):
            img = torch.randn(batch, 3, size, size)
            times = {}
            for fast in (True, False):
                for layer in model.layers:
                    layer.mixer.use_fast_path = fast
                with torch.inference_mode():
                    times[fast] = median_time(functools.partial(model, img), rep if size == 224 else 2)
            t = times[True]
            flops, exps, L = vim_flops_and_exps(model, img)
            flops, exps = flops * batch, exps * batch
            bound = flops / mm_rate + exps / exp_rate
            print(
                f"{size}x{size:<5} {batch:>5} {L:>6} {t * 1e3:9.1f} {times[False] * 1e3:10.1f} {flops / 1e9:7.2f} "
                f"{exps / 1e6:8.1f} {flops / t / 1e9:8.2f} {bound * 1e3:9.1f} {t / bound:11.2f}x"
            )


if __name__ == "__main__":
    main()
