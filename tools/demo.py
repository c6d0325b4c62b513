#!/usr/bin/env python
"""``make demo``: sample head data, the OFAT baseline in quick mode, then the results table."""

import sys

from rat_plugins.experiments.demo import main

if __name__ == "__main__":
    sys.exit(main())
