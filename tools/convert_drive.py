#!/usr/bin/env python
"""Convert raw DRIVE to the layout of mmseg's DRIVEDataset (see rat_plugins/data/drive.py).

    python tools/convert_drive.py path/to/DRIVE            # or training.zip test.zip
        [--out datasets/fundus/drive_mmseg] [--fov-ignore] [--overwrite]

Prints a one-line JSON summary; exit status 2 with one error line when the input is not raw DRIVE.
"""

import sys

from rat_plugins.data.drive import main

if __name__ == "__main__":
    sys.exit(main())
