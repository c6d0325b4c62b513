#!/usr/bin/env python
"""Fill the OFAT comparison table from work_dirs/ofat_*: Markdown, CSV and PNG plots.

python tools/summarize_ofat.py [--work-dirs work_dirs] [--out work_dirs]
"""

import sys

from rat_plugins.experiments.ofat import summary_main

if __name__ == "__main__":
    sys.exit(summary_main())
