import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cmd(args, cwd=REPO, env=None, timeout=900, check=True):
    """Run a command with the test interpreter first on PATH; return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full_env.get("PATH", "")
    full_env["PYTHON"] = sys.executable
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def detectron2_stock_tool() -> Path:
    """detectron2's own tools/lazyconfig_train_net.py, as the wheel installs it in site-packages."""
    import importlib.util

    spec = importlib.util.find_spec("tools.lazyconfig_train_net")
    assert spec is not None and "site-packages" in spec.origin, spec
    return Path(spec.origin)


@pytest.fixture(autouse=True)
def fresh_mmengine_default_scope():
    """Each test starts without an mmengine default scope.

    A Runner (or a config with ``default_scope``) leaves its scope as the process-wide current one,
    so a later test building from mmdet's registries would look in mmseg's, or the reverse.
    """
    yield
    try:
        from mmengine.registry import DefaultScope
    except ImportError:
        return
    DefaultScope._instance_dict.clear()


@pytest.fixture(scope="session", autouse=True)
def feature_cache_dir(tmp_path_factory):
    """Runs under test keep their frozen-feature caches in a temporary folder, not work_dirs/."""
    path = tmp_path_factory.mktemp("feature_cache")
    os.environ["RAT_FEATURE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def heads_data(tmp_path_factory):
    """A small synthetic Roboflow head export (train/valid/test), shared by the detectron2 tests."""
    from rat_plugins.data.synthetic import make_heads

    root = tmp_path_factory.mktemp("datasets")
    make_heads(root / "coco", n=8, seed=0, size=128)
    return root


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skipif(True, reason="needs a CUDA device (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
