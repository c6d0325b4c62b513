#!/usr/bin/env python
"""Train or evaluate a LazyConfig experiment (detectron2's CLI, CPU-capable).

Same arguments as detectron2's tools/lazyconfig_train_net.py:
    python tools/lazyconfig_train_net.py --config-file CFG [--num-gpus N] [--num-machines M
        --machine-rank R --dist-url URL] [--resume] [--eval-only] [key=value ...]
plus ``--micro-batch K`` (gradient accumulation: the config's batch stays the effective batch).
Without CUDA, ``--num-gpus N`` starts N CPU processes that train together over gloo.
``train.device=auto`` (the project's configs) means cuda if available, else cpu.
"""

import sys

from detectron2.engine import default_argument_parser, launch

import rat_plugins.detectron2  # noqa: F401  (registers the plugin's components)
from rat_plugins.detectron2.engine import load_config, main, run_guarded


def parse_args(argv=None):
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="images per forward pass per process; gradients are accumulated "
        "up to the config's batch (dataloader.train.total_batch_size)",
    )
    return parser.parse_args(argv)


def invoke_main(argv=None):
    args = parse_args(argv)
    run_guarded(load_config, args)  # report config / override / data errors once, before launching
    launch(
        run_guarded,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(main, args),
    )


if __name__ == "__main__":
    invoke_main(sys.argv[1:])
