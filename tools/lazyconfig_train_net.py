#!/usr/bin/env python
"""Train or evaluate a LazyConfig experiment (detectron2's CLI, CPU-capable).

Same arguments as detectron2's tools/lazyconfig_train_net.py:
    python tools/lazyconfig_train_net.py --config-file CFG [--num-gpus N] [--num-machines M
        --machine-rank R --dist-url URL] [--resume] [--eval-only] [key=value ...]
plus ``--micro-batch K`` (gradient accumulation: the config's batch stays the effective batch) and the
memory switches ``--amp [--amp-dtype bfloat16]``, ``--activation-checkpointing``, ``--clip-grad 1.0``.
Without CUDA, ``--num-gpus N`` starts N CPU processes that train together over gloo.
``train.device=auto`` (the project's configs) means cuda if available, else cpu.

Runs lose nothing (rat_plugins/detectron2/engine.py): checkpoints are written whole or not at all;
``--resume`` continues from the newest intact checkpoint; SIGTERM / SIGINT save a checkpoint at the
next iteration boundary and exit 0 (``RAT_STOP_SIGNALS=USR1`` adds a scheduler's warning signal);
a second run into the same ``train.output_dir`` refuses; a restart with another config refuses,
naming the keys that differ; ``--eval-only`` refuses a checkpoint that does not fit the model.
Input errors exit 2 with one ``error:`` line, a full disk exits 1 naming the file.
"""

import sys

from detectron2.engine import default_argument_parser

import rat_plugins.detectron2  # noqa: F401  (registers the plugin's components)
from rat_plugins.detectron2.engine import launch_from_cli
from rat_plugins.engine.memory_cli import add_memory_arguments


def parse_args(argv=None):
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="images per forward pass per process; gradients are accumulated "
        "up to the config's batch (dataloader.train.total_batch_size)",
    )
    add_memory_arguments(parser, amp_help="mixed precision (train.amp.enabled; float16 needs CUDA)")
    parser.add_argument("--deepspeed", metavar="STAGE", help="not in this tool family: see the error it gives")
    args = parser.parse_args(argv)
    if args.deepspeed is not None:
        parser.exit(
            2,
            f"error: --deepspeed {args.deepspeed}: detectron2's trainer has no DeepSpeed path. DeepSpeed ZeRO "
            "runs through the OpenMMLab tool family: python tools/train.py CONFIG --deepspeed zero2|zero3 "
            "(mmengine's FlexibleRunner); here, --activation-checkpointing, --amp-dtype bfloat16 and "
            "--micro-batch fit a run into memory\n",
        )
    return args


def invoke_main(argv=None):
    launch_from_cli(parse_args(argv))


if __name__ == "__main__":
    invoke_main(sys.argv[1:])
