#!/usr/bin/env python
"""Submit a project config as a SLURM or LSF job: python tools/submit.py CONFIG [options] [key=value ...].

--dry-run prints the job script and the submit command; see rat_plugins/cluster/submit.py for the options
and the site file (~/.config/rat-plugins/cluster.toml).
"""

import sys

from rat_plugins.cluster.submit import main

if __name__ == "__main__":
    sys.exit(main())
