#!/usr/bin/env python
"""The RAT study's positive controls: the pipeline must recover answers known by construction.

    python tools/run_rat_controls.py [--seeds 0 1 2] [--iters N] [--work-dir work_dirs/rat_controls]

Trains the context control's single- and triple-scale configs (projects/RAT/configs/controls) at
every seed and writes ``<work-dir>/controls.{md,csv,json}``. Exit code 1 when the triple-scale model
does not beat the single-scale one by more than the spread over seeds.
"""

import sys

from rat_plugins.experiments.controls import main

if __name__ == "__main__":
    sys.exit(main())
