"""OpenMMLab adapters. Importing this package registers every component into mmseg / mmdet.

Configs load it with ``custom_imports = dict(imports=['rat_plugins.mm'], allow_failed_imports=False)``.
"""

from .._optional import failing_package, framework_missing_error

try:
    import mmdet  # noqa: F401
    import mmengine  # noqa: F401
    import mmseg  # noqa: F401
    import mmcv.ops  # noqa: F401  (compiled ops: mmdet needs them at model build)
except Exception as e:  # also a version assertion (mmseg refusing the mmcv) or a broken compiled op
    raise framework_missing_error(failing_package(e) or "mmseg", "rat_plugins.mm", e) from e

# registration happens at class definition: one import per module, by model family
from . import checkpoint  # noqa: E402,F401  (mmengine checkpoints under torch>=2.6 weights-only loading)
from . import datasets  # noqa: E402,F401  (Roboflow export, ISIC 2018, RVT event clips + PackEventClip)
from . import deepspeed  # noqa: E402,F401  (SafeDeepSpeedStrategy: whole DeepSpeed checkpoints)
from . import loops  # noqa: E402,F401  (training loops that resume exactly)
from . import maxvit_rnn  # noqa: E402,F401  (RVT's MaxViT-RNN backbone)
from . import metrics  # noqa: E402,F401  (VesselMetric, LesionMetric)
from . import rat  # noqa: E402,F401  (RAT backbone: maps per pyramid level and block)
from . import runner  # noqa: E402,F401  (the OpenMMLab tools' shared CLI)
from . import rvt_detector  # noqa: E402,F401  (recurrent YOLOX over event clips, clip preprocessor)
from . import tracking  # noqa: E402,F401  (MLflow vis backend)
from . import setr  # noqa: E402,F401  (SETR's frozen ViT encoder)
from . import vim  # noqa: E402,F401  (ViM backbone)
from . import yolox_rvt  # noqa: E402,F401  (RVT PAFPN neck, size-aware YOLOX head)
