import os

import pytest


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


@pytest.fixture(scope="session", autouse=True)
def data_check_cache_dir(tmp_path_factory):
    """The data checks' cache of passed checks goes to a temporary folder, not ~/.cache."""
    path = tmp_path_factory.mktemp("data_checks")
    os.environ["RAT_DATA_CHECK_CACHE"] = str(path)
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


# -- small synthetic datasets, written once per session in the official layouts ------------------
@pytest.fixture(scope="session")
def fundus_data(tmp_path_factory):
    """``<root>/fundus/drive_mmseg``: 4 DRIVE-style fundus images per split (mmseg layout)."""
    from rat_plugins.data.synthetic import make_fundus

    root = tmp_path_factory.mktemp("setr_datasets")
    make_fundus(root / "fundus" / "drive_mmseg", n=4, seed=0, size=40, layout="mmseg")
    return root


@pytest.fixture(scope="session")
def isic_data(tmp_path_factory):
    """``<root>/isic2018``: 4 ISIC 2018 Task 1 images per split, 48x72."""
    from rat_plugins.data.synthetic import make_isic

    root = tmp_path_factory.mktemp("rat_datasets")
    make_isic(root / "isic2018", n=4, seed=0, size=(48, 72))
    return root


@pytest.fixture(scope="session")
def events_data(tmp_path_factory):
    """``<root>/events/etram``: 2 sequences per split in RVT's preprocessed layout, 64x64."""
    from rat_plugins.data.synthetic import make_events

    root = tmp_path_factory.mktemp("datasets")
    make_events(root / "events" / "etram", n=2, seed=0, size=64, frames=12, label_every=2)
    return root


# -- a real single-node SLURM (tools/local_slurm.sh), started once per session when a test asks --
@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """``{"SLURM_CONF": ...}`` of a running localhost SLURM; its daemons are stopped at the end.

    Installs Debian's slurm and munge when missing (root and apt-get needed); a machine where that
    is impossible fails the test with the reason (deselect with ``-m "not slurm"``).
    """
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "local_slurm.sh"
    folder = tmp_path_factory.mktemp("slurm")
    for step in (["install"], ["start", str(folder)]):
        proc = subprocess.run(["bash", str(script), *step], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            pytest.fail(f"cannot run a local SLURM (tools/local_slurm.sh {step[0]}): {proc.stderr.strip()[-2000:]}")
    env = {"SLURM_CONF": str(folder / "slurm.conf")}
    try:
        yield env
    finally:
        subprocess.run(["bash", str(script), "stop", str(folder)], capture_output=True, text=True, timeout=120)
