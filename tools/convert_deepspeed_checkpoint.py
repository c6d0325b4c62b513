#!/usr/bin/env python
"""A DeepSpeed checkpoint (the folder tools/train.py --deepspeed saves, e.g. work_dirs/x/iter_4.pth/)
as a plain mmengine checkpoint for tools/test.py and the other ordinary tools.

python tools/convert_deepspeed_checkpoint.py work_dirs/x/iter_4.pth work_dirs/x/iter_4_plain.pth
"""

import argparse
import sys

from rat_plugins.utils.config_keys import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="the DeepSpeed checkpoint folder")
    p.add_argument("out", help="the plain checkpoint to write (.pth)")
    args = p.parse_args(argv)
    from rat_plugins.mm.deepspeed import to_plain_checkpoint

    try:
        state_dict = to_plain_checkpoint(args.checkpoint, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(state_dict)} tensors, {sum(v.numel() for v in state_dict.values())} values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
