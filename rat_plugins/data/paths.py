"""Where datasets live: one root for every loader, like detectron2's ``DETECTRON2_DATASETS``."""

import os
from pathlib import Path

__all__ = ["dataset_root", "DATASET_ROOT_VARIABLES"]

# First one set wins; detectron2's own variable is honoured so existing set-ups keep working.
DATASET_ROOT_VARIABLES = ("RAT_DATASETS", "DETECTRON2_DATASETS")


def dataset_root() -> Path:
    """The folder that holds ``coco/``, ``isic2018/``, ``fundus/``, ``events/``, ``coco2017/``.

    ``$RAT_DATASETS``, else ``$DETECTRON2_DATASETS``, else ``./datasets``.
    """
    for var in DATASET_ROOT_VARIABLES:
        value = os.environ.get(var)
        if value:
            return Path(value).expanduser()
    return Path("datasets")
