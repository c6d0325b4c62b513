#!/usr/bin/env python
"""Write an experiment's record (hypothesis, modifications, command, code changes) from its configs.

    python tools/experiment_record.py CONFIG --baseline BASE [--out DIR] [--force]

Writes hypothesis.md, modifications.md, command.md and code_changes.md to ``--out`` (default
``work_dirs/records/<config stem>/``); see :mod:`rat_plugins.experiments.records`.
"""

import sys

from rat_plugins.experiments.records import main

if __name__ == "__main__":
    sys.exit(main())
