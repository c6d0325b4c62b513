#!/usr/bin/env python
"""Train an mmseg or mmdet config (the OpenMMLab tools/train.py CLI), CPU-capable.

python tools/train.py CONFIG [--work-dir DIR] [--resume] [--amp] [--cfg-options k=v ...]
tools/dist_train.sh CONFIG GPUS [args]       # torchrun; gloo on CPU
"""

import sys

import rat_plugins.mm  # noqa: F401  (registers the plugin's components)
from rat_plugins.mm.runner import ConfigError, build_runner, load_config, train_parser


def main(argv=None):
    args = train_parser().parse_args(argv)
    try:
        cfg = load_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    build_runner(cfg).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
