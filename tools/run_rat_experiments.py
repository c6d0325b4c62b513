#!/usr/bin/env python
"""Run the RAT ISIC 2018 experiments by group and collect every result into one table.

    python tools/run_rat_experiments.py segmentation ablations robustness [--quick] [--work-dir DIR]
    python tools/run_rat_experiments.py all --quick          # the whole chain on synthetic data, CPU

Runs go to ``<work-dir>/<group>/<config>/``; the tables to ``<work-dir>/results.{md,csv}`` and
``<work-dir>/robustness.{md,csv,png}``. Exit code 1 if any run failed.
"""

import sys

from rat_plugins.experiments.rat_study import main

if __name__ == "__main__":
    sys.exit(main())
