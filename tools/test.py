#!/usr/bin/env python
"""Evaluate a checkpoint of an mmseg or mmdet config (the OpenMMLab tools/test.py CLI).

python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out OUT] [--cfg-options k=v ...]

The checkpoint must fit the model exactly (another model size, missing or unexpected keys: exit 2,
naming the first mismatches). --out: mmdet, a .pkl of the predictions; mmseg, a folder of masks.
"""

import errno
import os
import sys

import rat_plugins.mm  # noqa: F401  (registers the plugin's components)
from rat_plugins.engine.distributed import closing_process_group
from rat_plugins.mm.runner import ConfigError, build_runner, load_config, prepare_testing, test_parser

EXIT_CONFIG, EXIT_DISK_FULL = 2, 1


def main(argv=None):
    args = test_parser().parse_args(argv)
    try:
        if not os.path.isfile(args.checkpoint):
            raise ConfigError(f"checkpoint not found: {args.checkpoint}")
        cfg = prepare_testing(load_config(args), args.checkpoint, args.out)
        build_runner(cfg).test()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = e.filename or args.out or "the work dir"
        message = e.strerror if "disk full" in (e.strerror or "") else f"disk full while writing {where} ({e})"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_DISK_FULL
    return 0


if __name__ == "__main__":
    with closing_process_group():  # before the interpreter finalizes: no gloo thread outlives it
        status = main()
    sys.exit(status)
