#!/usr/bin/env python
"""Check an mmseg config before training: model, parameter counts, one forward pass, weights, data.

    python tools/check_config.py CONFIG [--cfg-options k=v ...] [--data-check {header,full}]

The data of every loader is checked as training checks it: files exist and decode, masks have
their image's size, the classes match the model's num_classes.

Exit status 1 when something is missing or fails (one ``MISSING:`` line each), 2 for a config error.
"""

import sys

from rat_plugins.experiments.config_check import main

if __name__ == "__main__":
    sys.exit(main())
