"""Helpers for optional dependencies: one clear ImportError naming the install step."""

import importlib

__all__ = ["require", "framework_missing_error"]

_INSTALL_HINTS = {
    "detectron2": "run `make install` (tools/install.sh installs detectron2), or build detectron2 from source",
    "mmdet": "run `make install`, or `pip install -e .[mm]` with mmcv 2.1.0 compiled with ops",
    "mmseg": "run `make install`, or `pip install -e .[mm]` with mmcv 2.1.0 compiled with ops",
    "mmengine": "run `make install`, or `pip install -e .[mm]`",
    "mmcv": "run `make install` (it compiles mmcv 2.1.0 with CPU ops and caches the wheel)",
    "mamba_ssm": "on a CUDA machine: `pip install -e .[cuda]`",
    "h5py": "`pip install -e .[events]`",
    "resolution_aware_transformer": "`pip install -e .[rat]`",
}


def framework_missing_error(module: str, needed_by: str, cause: BaseException) -> ImportError:
    hint = _INSTALL_HINTS.get(module.split(".")[0], f"pip install {module}")
    return ImportError(f"{needed_by} needs `{module}`, which cannot be imported ({cause}). To fix: {hint}.")


def require(module: str, needed_by: str):
    """Import ``module`` or raise an ImportError that says which install step is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise framework_missing_error(module, needed_by, e) from e
