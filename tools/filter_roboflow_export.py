#!/usr/bin/env python
"""Filter and check a Roboflow COCO export: writes _annotations.coco_filtered.json per split.

python tools/filter_roboflow_export.py [--root datasets/coco] [--splits train valid test]
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from rat_plugins.data.paths import dataset_root
from rat_plugins.data.roboflow import FILTERED_NAME, ORIGINAL_NAME, filter_roboflow_coco


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="export folder (default: <dataset root>/coco)")
    parser.add_argument("--splits", nargs="+", default=["train", "valid", "test"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.root or dataset_root() / "coco"
    try:
        for split in args.splits:
            stats = filter_roboflow_coco(root / split / ORIGINAL_NAME, root / split / FILTERED_NAME)
            print(json.dumps(dict(split=split, **stats)))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
