"""Helpers for optional dependencies: one clear ImportError naming the install step.

A dependency can fail at import in more ways than ImportError: mmseg and mmdet assert that the
installed mmcv / mmengine versions are in their range (AssertionError), a compiled extension built
for another torch raises OSError or RuntimeError. Each becomes the same kind of error here.
"""

import importlib

__all__ = ["require", "framework_missing_error", "install_hint", "import_failure", "failing_package"]

_INSTALL_HINTS = {
    "detectron2": "run `make install` (tools/install.sh installs detectron2), or build detectron2 from source",
    "mmdet": "run `make install`, or `pip install -e .[mm]` with mmcv 2.1.0 compiled with ops",
    "mmseg": "run `make install`, or `pip install -e .[mm]` with mmcv 2.1.0 compiled with ops",
    "mmengine": "run `make install`, or `pip install -e .[mm]`",
    "mmcv": "run `make install` (it compiles mmcv 2.1.0 with CPU ops and caches the wheel)",
    "mamba_ssm": "on a CUDA machine: `pip install -e .[cuda]`",
    "h5py": "`pip install -e .[events]`",
    "hdf5plugin": "`pip install -e .[events]`",
    "resolution_aware_transformer": "`pip install -e .[rat]`",
    "spatial_grouping_attention": "`pip install -e .[rat]`",
}
# mmseg / mmdet refuse an mmcv or mmengine outside their range with an AssertionError at import
_VERSION_HINT = (
    "install the pinned versions (mmcv 2.1.0, mmengine 0.10.7; requirements/constraints.txt): "
    "run `make install`, which puts them back into .venv"
)


def install_hint(module: str, cause: BaseException = None) -> str:
    """What to run so that ``module`` imports (given the error its import raised, if any)."""
    if isinstance(cause, AssertionError) and "incompatible" in str(cause):
        return _VERSION_HINT
    return _INSTALL_HINTS.get(module.split(".")[0], f"pip install {module.split('.')[0]}")


def import_failure(cause: BaseException) -> str:
    """``"AssertionError: first line of the message"``, short enough for one line."""
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:160] if lines else '(no message)'}"


def failing_package(cause: BaseException):
    """The top-level package whose import failed: the missing one for an ImportError, else the one
    whose code raised (mmseg for its mmcv assertion, detectron2 when mmdet imports a broken one)."""
    if isinstance(cause, ImportError) and cause.name:
        return cause.name.split(".")[0]
    tb, name = cause.__traceback__, None
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__") or name
        tb = tb.tb_next
    return name.split(".")[0] if name and name != "__main__" else None


def framework_missing_error(module: str, needed_by: str, cause: BaseException) -> ImportError:
    return ImportError(
        f"{needed_by} needs `{module}`, which cannot be imported ({import_failure(cause)}). "
        f"To fix: {install_hint(module, cause)}."
    )


def require(module: str, needed_by: str):
    """Import ``module`` or raise an ImportError that says which install step is missing.

    Any exception at import counts (a version assertion, a broken compiled extension), not only
    ImportError: the caller gets one error naming the module and the fix, not a foreign traceback.
    """
    try:
        return importlib.import_module(module)
    except Exception as e:
        raise framework_missing_error(module, needed_by, e) from e
