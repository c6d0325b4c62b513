#!/usr/bin/env python
"""Evaluate one trained RAT segmentation model at several input resolutions.

    python tools/evaluate_robustness.py --config C --checkpoint K --resolutions 128 256 512 1024 \
        [--train-resolution 256] [--metric Dice] [--out DIR] [--max-memory-gb 8] [--cfg-options k=v ...]

``C`` may be the ``run_config.py`` a run of tools/run_rat_experiments.py left in its work dir.
"""

import sys

from rat_plugins.experiments.robustness import main

if __name__ == "__main__":
    sys.exit(main())
