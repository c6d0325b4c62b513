#!/usr/bin/env python
"""Train a config with Ray Train workers, each running the project's training tool for the config.

python tools/ray_train.py CONFIG --num-workers N [--use-gpu] [--address auto|HOST:PORT] [--max-failures K] [tool args]
"""

import sys

from rat_plugins.cluster.ray_train import main

if __name__ == "__main__":
    sys.exit(main())
