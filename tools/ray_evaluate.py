#!/usr/bin/env python
"""Spread an evaluation over Ray workers: the RAT robustness resolutions, one task each, with the tables
tools/evaluate_robustness.py writes.

python tools/ray_evaluate.py CONFIG CHECKPOINT --robustness --resolutions 128 256 512 1024 [--num-workers N]
"""

import sys

from rat_plugins.cluster.ray_train import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
