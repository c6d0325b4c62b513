#!/usr/bin/env python
"""Filter and check a Roboflow COCO export: writes _annotations.coco_filtered.json per split.

python tools/filter_roboflow_export.py [--root datasets/coco] [--splits train valid test]
    [--classes head ...] [--data-check {header,full}]

Each split's images are checked too (they exist, decode, have the annotated size); dropped boxes
are reported on stderr with their first few annotation ids. Exit status 2 when a split cannot be used.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from rat_plugins.data.paths import dataset_root
from rat_plugins.data.roboflow import check_roboflow_split
from rat_plugins.utils.config_keys import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="export folder (default: <dataset root>/coco)")
    parser.add_argument("--splits", nargs="+", default=["train", "valid", "test"])
    parser.add_argument(
        "--classes", nargs="+", default=None, help="the classes to keep, in the model's order (default: all)"
    )
    parser.add_argument(
        "--data-check",
        choices=("header", "full"),
        default=None,
        help="header: every image opens and is complete (default, $RAT_DATA_CHECK); full: decode every image",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    root = args.root or dataset_root() / "coco"
    try:
        for split in args.splits:
            stats = check_roboflow_split(
                root / split, classes=args.classes, split=f"{split} split", mode=args.data_check
            )
            print(json.dumps(dict(split=split, **stats)))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
