"""Small, deterministic synthetic datasets in exactly the layouts of the real ones.

One module per family: ``head_detection`` (Roboflow COCO export), ``isic`` (ISIC 2018 Task 1),
``fundus`` (DRIVE, raw or mmseg layout), ``events`` (RVT preprocessed) and ``coco2017``. Each
writes a set whose learnable signal has a known answer, with the imperfections real exports have
(layouts: ``docs/formats.md``, ``datasets/README.md``). Same arguments and seed give
byte-identical files; only numpy, Pillow and (for ``events``) h5py are used. Writes are atomic. A
non-empty output folder is refused unless ``overwrite=True`` / ``--overwrite``, which first
removes only the entries the generator owns (e.g. ``train/ valid/ test/`` for ``heads``)::

    python -m rat_plugins.data.synthetic heads  --out datasets/coco
    python -m rat_plugins.data.synthetic isic   --out datasets/isic2018
    python -m rat_plugins.data.synthetic isic-context --out datasets/isic2018  (the RAT context control)
    python -m rat_plugins.data.synthetic isic-radius --out datasets/isic2018   (the physical-units control)
    python -m rat_plugins.data.synthetic fundus --out datasets/fundus [--layout mmseg]
    python -m rat_plugins.data.synthetic events --out datasets/events/synthetic
    python -m rat_plugins.data.synthetic events-memory --out datasets/events/memory  (RVT's memory control)
    python -m rat_plugins.data.synthetic coco   --out datasets/coco2017

Common options: ``--n N`` (size of the first split), ``--seed S``, ``--size`` (``640``, ``WxH``;
for ``isic`` a range ``LO,HI``), ``--overwrite``.
"""

from ._common import DatasetExistsError
from .cli import GENERATORS, main
from .coco2017 import COCO_CATEGORIES, make_coco
from .events import EVENT_CLASSES, EVENT_H5_NAME, EVENT_REPR_NAME, RVT_LABEL_DTYPE, make_events, make_events_memory
from .fundus import make_fundus
from .head_detection import HEADS_CATEGORIES, make_heads
from .isic import make_isic, make_isic_context, make_isic_radius

__all__ = [
    "make_heads",
    "make_isic",
    "make_isic_context",
    "make_isic_radius",
    "make_fundus",
    "make_events",
    "make_events_memory",
    "make_coco",
    "main",
    "DatasetExistsError",
    "GENERATORS",
    "HEADS_CATEGORIES",
    "COCO_CATEGORIES",
    "EVENT_CLASSES",
    "EVENT_H5_NAME",
    "EVENT_REPR_NAME",
    "RVT_LABEL_DTYPE",
]
