"""OpenMMLab adapters. Importing this package registers every component into mmseg / mmdet.

Configs load it with ``custom_imports = dict(imports=['rat_plugins.mm'], allow_failed_imports=False)``.
"""
from .._optional import framework_missing_error

try:
    import mmdet  # noqa: F401
    import mmengine  # noqa: F401
    import mmseg  # noqa: F401
    import mmcv.ops  # noqa: F401  (compiled ops: mmdet needs them at model build)
except ImportError as e:
    raise framework_missing_error(getattr(e, "name", None) or "mmseg", "rat_plugins.mm", e) from e

from . import runner  # noqa: E402,F401
from . import setr, metrics  # noqa: E402,F401  (SETR encoder, vessel metrics)
from . import vim  # noqa: E402,F401  (ViM backbone, Roboflow COCO dataset)
from . import maxvit_rnn  # noqa: E402,F401  (RVT's MaxViT-RNN backbone)
from . import yolox_rvt  # noqa: E402,F401  (RVT PAFPN neck, size-aware YOLOX head)
from . import rvt_data  # noqa: E402,F401  (RVT-layout event clips dataset, PackEventClip)
from . import rat  # noqa: E402,F401  (RAT backbone: maps per pyramid level and block)
from . import checkpoint  # noqa: E402,F401  (mmengine checkpoints under torch>=2.6 weights-only loading)
from . import rvt_detector  # noqa: E402,F401  (recurrent YOLOX over event clips, clip preprocessor)
from . import isic  # noqa: E402,F401  (ISIC 2018 dataset, LesionMetric, RAT ablation backbone)
