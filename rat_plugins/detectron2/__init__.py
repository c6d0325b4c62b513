"""detectron2 adapters. Importing this package registers every component into detectron2."""

from .._optional import framework_missing_error

try:
    import detectron2  # noqa: F401
    from detectron2.modeling import BACKBONE_REGISTRY  # noqa: F401
except Exception as e:  # one clear error instead of a traceback deep in an adapter
    raise framework_missing_error("detectron2", "rat_plugins.detectron2", e) from e

from . import data, engine, maxvit_rnn, rat, schedule, vim  # noqa: E402,F401  (registration happens on import)
