"""Per-process parameter and optimizer memory under DeepSpeed ZeRO, measured side by side in one run.

    PYTHONPATH=<DeepSpeed's folder> .venv/bin/python benchmarks/bench_zero_memory.py [--quick] [--world-size 2]

For each model (a RAT of 256-wide features, mmseg's ViT-B/16 trainable as SETR fine-tunes it) and
each engine (plain data parallel with AdamW, ZeRO-2, ZeRO-3, ZeRO-3 with optimizer and parameters
offloaded to CPU), ``world-size`` processes (gloo, 127.0.0.1) take one AdamW step through
``deepspeed.initialize`` with the project's DeepSpeed config (:mod:`rat_plugins.engine.deepspeed_config`),
then each rank sums the bytes of the tensors it holds:

- params: the model's parameters as this rank holds them (ZeRO-3: its partition, ``ds_tensor``);
- optimizer: the fp32 master partition ZeRO steps on plus AdamW's moments for it (plain: AdamW's
  moments for every parameter);
- where: on the accelerator, or offloaded to CPU memory (on a CPU-only machine both are host
  memory; the split says where DeepSpeed keeps them on a GPU machine).

The figures are rank 0's (every rank holds the same share, up to padding). Gradients and
activations are left out: they depend on the batch and on ZeRO's bucket sizes, not on the stage alone.
"""

import argparse
import json
import os
import socket
import sys
import tempfile

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

ENGINES = [
    ("plain DDP + AdamW", None, {}),
    ("ZeRO-2", 2, {}),
    ("ZeRO-3", 3, {}),
    ("ZeRO-3, offload optimizer + params", 3, dict(offload_optimizer="cpu", offload_param="cpu")),
]


def models(quick: bool):
    """(name, build(), input shape)."""
    from mmseg.models.backbones import VisionTransformer

    from rat_plugins.models.rat_backbone import RATBackbone

    dims, blocks = (64, 2) if quick else (256, 4)
    yield (
        f"RAT {dims} wide, {blocks} blocks, 3 scales",
        lambda: RATBackbone(
            feature_dims=dims, num_blocks=blocks, num_heads=4, scales=(1.0, 0.5, 0.25), attention="local"
        ),
        (1, 3, 64, 64),
    )
    embed, layers = (192, 2) if quick else (768, 12)
    yield (
        f"ViT-{'tiny' if quick else 'B'}/16 trainable (SETR)",
        lambda: VisionTransformer(img_size=(64, 64), embed_dims=embed, num_layers=layers, num_heads=embed // 64),
        (1, 3, 64, 64),
    )


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _tensors(out):
    if torch.is_tensor(out):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


def _features_loss(out):
    return sum((t.float() ** 2).mean() for t in _tensors(out))


def _measure_plain(model, x) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _features_loss(model(x)).backward()
    optimizer.step()
    moments = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    return dict(params=_bytes(model.parameters()), optimizer=_bytes(moments), offloaded=0)


def _measure_zero(model, x, stage: int, offload: dict) -> dict:
    import deepspeed

    from rat_plugins.engine.deepspeed_config import deepspeed_config

    config = deepspeed_config(stage, micro_batch=1, **offload)
    engine, optimizer, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4), config=config
    )
    loss = _features_loss(engine(x))
    engine.backward(loss)
    engine.step()
    held = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    if stage == 3:
        masters = list(optimizer.fp32_partitioned_groups_flat)
    else:
        masters = list(optimizer.single_partition_of_fp32_groups)
    base = optimizer.optimizer
    moments = [t for state in base.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    optimizer_bytes = _bytes(masters) + _bytes(moments)
    params_bytes = _bytes(held)
    offloaded = (optimizer_bytes if "offload_optimizer" in offload else 0) + (
        params_bytes if "offload_param" in offload else 0
    )
    return dict(params=params_bytes, optimizer=optimizer_bytes, offloaded=offloaded)


def _worker(rank, world, port, model_index, engine_index, quick, out):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    _, build, shape = list(models(quick))[model_index]
    _, stage, offload = ENGINES[engine_index]
    model, x = build(), torch.randn(*shape)
    figures = _measure_plain(model, x) if stage is None else _measure_zero(model, x, stage, offload)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(figures, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models (a smoke run)")
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args(argv)
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        print("error: DeepSpeed is not importable: pip install -e .[deepspeed], or put its folder on PYTHONPATH")
        return 2
    mb = 1024**2
    print(f"per-process memory after one AdamW step, {args.world_size} processes (rank 0), MB")
    print("| model | engine | params | optimizer | total | of which offloaded to CPU |\n|---|---|---|---|---|---|")
    for m, (name, _, _) in enumerate(models(args.quick)):
        for e, (engine, _, _) in enumerate(ENGINES):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                mp.spawn(_worker, (args.world_size, _free_port(), m, e, args.quick, out.name), nprocs=args.world_size)
                figures = json.load(open(out.name))
            total = figures["params"] + figures["optimizer"]
            print(
                f"| {name} | {engine} | {figures['params'] / mb:.1f} | {figures['optimizer'] / mb:.1f} "
                f"| {total / mb:.1f} | {figures['offloaded'] / mb:.1f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
