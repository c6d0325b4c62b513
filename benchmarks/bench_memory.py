"""Memory of a training step per backbone, with and without activation checkpointing and bfloat16.

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--threads 1] [--device cpu|cuda]

For each backbone (ViM-tiny, a RAT of 4 blocks over 3 scales, RVT's MaxViT-RNN tiny, SETR's ViT-S
when mmseg is installed) one forward + backward of ``sum(feature ** 2)`` in four modes, side by
side in one run: plain float32, activation checkpointing (``set_grad_checkpointing`` / ``with_cp``),
bfloat16 autocast, and both. Columns:

- saved: the bytes autograd keeps for backward (each storage once), the activation memory the
  switches act on; exact and independent of the allocator and of other processes. With
  checkpointing it is what stays saved between the blocks; the backward pass recomputes one
  block at a time, so the peak adds one block's activations;
- peak: on CUDA, ``torch.cuda.max_memory_allocated`` of the step; on CPU not measured (the process's
  peak RSS mixes every case);
- time: the step's median wall time (checkpointing adds one forward of each block);
- out / grad: the largest difference from the plain float32 step, relative to the largest value
  (checkpointing: the same computation, ~0; bfloat16: its ~3 significant digits).
"""

import argparse
import functools
import os
import sys

import torch
from _timing import SavedForBackward, add_threads_argument, load_note, median_time, print_table, set_threads  # noqa: E402  (benchmarks/ is on sys.path)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rat_plugins.models.checkpointing import enable_activation_checkpointing  # noqa: E402

MODES = [("float32", False, None), ("checkpointing", True, None), ("bf16", False, torch.bfloat16)]
MODES.append(("checkpointing + bf16", True, torch.bfloat16))


def backbones(quick: bool):
    """(name, build(), input) per backbone; quick: smaller inputs and depths."""
    from rat_plugins.models.maxvit_rnn import MaxViTRNN
    from rat_plugins.models.rat_backbone import RATBackbone
    from rat_plugins.models.vim import VimBackbone

    size = 64 if quick else 224
    yield f"ViM-tiny {size}px", lambda: VimBackbone(depth=4 if quick else 24), torch.randn(1, 3, size, size)
    rat_size = 64 if quick else 128
    yield (
        f"RAT 4 blocks, 3 scales, {rat_size}px",
        lambda: RATBackbone(feature_dims=64, num_blocks=4, num_heads=4, scales=(1.0, 0.5, 0.25), attention="local"),
        torch.randn(1, 3, rat_size, rat_size),
    )
    h, w = (64, 64) if quick else (256, 320)
    yield f"MaxViT-RNN tiny {h}x{w}", lambda: MaxViTRNN(embed_dim=32, dim_head=32), torch.randn(1, 20, h, w)
    try:
        from mmseg.models.backbones import VisionTransformer
    except ImportError:
        print("SETR ViT-S: mmseg is not installed, row left out", file=sys.stderr)
        return
    vit_size = 64 if quick else 224
    yield (
        f"SETR ViT-S/16 {vit_size}px",
        lambda: VisionTransformer(
            img_size=vit_size, embed_dims=384, num_layers=4 if quick else 12, num_heads=6, out_indices=(2, 5, 8, 11)
        ),
        torch.randn(1, 3, vit_size, vit_size),
    )


def _features(model, x):
    out = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
    if isinstance(out, tuple) and isinstance(out[0], dict):  # MaxViT-RNN: (features, states)
        out = out[0]
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, (tuple, list)) else [out]


def step(model, x, checkpointing: bool, dtype, device):
    """One forward + backward: (outputs, gradients, saved bytes, CUDA peak or None)."""
    if checkpointing:
        enable_activation_checkpointing(model)
    model.zero_grad(set_to_none=True)
    counter = SavedForBackward()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    )
    with counter.hooks(), autocast:
        features = _features(model, x)
        loss = sum(f.float().pow(2).mean() for f in features)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return [f.detach().float() for f in features], grads, counter.mb, peak


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs and depths (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {threads} threads, {load_note()}")
    rows = []
    for name, build, x in backbones(args.quick):
        reference = None
        for mode, checkpointing, dtype in MODES:
            torch.manual_seed(0)
            model, x_dev = build().to(device), x.to(device)
            model.train()  # not chained: mmseg's ViT.train() returns None
            try:
                outputs, grads, saved, peak = step(model, x_dev, checkpointing, dtype, device)
            except (RuntimeError, NotImplementedError) as e:  # a mode the model's ops do not support here
                rows.append([name, mode, f"fails: {type(e).__name__}: {str(e).splitlines()[0][:60]}", "", "", "", ""])
                print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
                continue
            again = functools.partial(step, model, x_dev, checkpointing, dtype, device)
            seconds = median_time(again, args.repeats, warmup=0)
            if reference is None:
                reference = (outputs, grads)
            out_diff = max(_relative(o, r) for o, r in zip(outputs, reference[0]))
            rows.append(
                [
                    name,
                    mode,
                    f"{saved:.1f}",
                    "-" if peak is None else f"{peak:.1f}",
                    f"{seconds:.3f}",
                    f"{out_diff:.1e}",
                    f"{_relative(grads, reference[1]):.1e}",
                ]
            )
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print()
    print_table(["backbone", "mode", "saved MB", "CUDA peak MB", "step s", "out diff", "grad diff"], rows)


if __name__ == "__main__":
    main()
