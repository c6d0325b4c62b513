#!/usr/bin/env python
"""Evaluate a checkpoint of an mmseg or mmdet config (the OpenMMLab tools/test.py CLI).

python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options k=v ...]
"""

import os
import sys

import rat_plugins.mm  # noqa: F401  (registers the plugin's components)
from rat_plugins.mm.runner import ConfigError, build_runner, load_config, test_parser


def main(argv=None):
    args = test_parser().parse_args(argv)
    try:
        if not os.path.isfile(args.checkpoint):
            raise ConfigError(f"checkpoint not found: {args.checkpoint}")
        cfg = load_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg.load_from = args.checkpoint
    if args.out:
        cfg.setdefault("test_evaluator", {})["output_dir"] = args.out
    build_runner(cfg).test()
    return 0


if __name__ == "__main__":
    sys.exit(main())
