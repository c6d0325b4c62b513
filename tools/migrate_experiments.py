#!/usr/bin/env python
"""Convert the RAT experiment framework's YAML experiments into project configs and run scripts.

python tools/migrate_experiments.py OLD.yaml... --out DIR [--old-experiments-dir DIR]

Segmentation experiments become OpenMMLab configs on the project's RAT ISIC configs, detection
experiments detectron2 LazyConfigs on its RAT COCO config; DIR/migration_report.txt lists every
legacy key: mapped, handled otherwise, or not mapped (and why).
"""

import sys

from rat_plugins.experiments.migrate import migrate_main

if __name__ == "__main__":
    sys.exit(migrate_main())
