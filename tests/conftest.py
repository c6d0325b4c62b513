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
def tracking_off_unless_asked():
    """Runs under test do not track (tests/test_tracking.py turns it on for its own), and MLflow's telemetry
    stays off."""
    os.environ["RAT_TRACKING"] = "0"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["DO_NOT_TRACK"] = "true"


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


@pytest.fixture(autouse=True)
def one_ray_at_a_time(request):
    """Under pytest-xdist (make test: -n N --dist loadfile, so the SLURM tests, all in one file, share one
    worker and its localhost cluster), a test that starts a local Ray waits for any other worker's Ray test
    to end: Ray does not support two local instances on one machine at once."""
    name = request.node.nodeid
    if not os.environ.get("PYTEST_XDIST_WORKER") or not ("test_ray_train.py" in name or "ray_evaluate" in name):
        yield
        return
    with _InstallLock(f"/tmp/rat-plugins-ray-{os.getuid()}"):
        yield


@pytest.fixture(scope="session", autouse=True)
def own_torchrun_port():
    """Each pytest-xdist worker's tools/dist_train.sh runs get a port of their own (``$PORT``; the script's
    default, 29500, would be shared by two workers' runs at the same moment)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and "PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["PORT"] = str(s.getsockname()[1])
    yield


class _InstallLock:
    """One holder at a time across the test processes (``<path>.lock``, flock): an installer of a folder
    they share, or a test of a machine-wide service."""

    def __init__(self, folder):
        from pathlib import Path

        self.path = Path(str(folder) + ".lock")

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock


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


# -- DeepSpeed, in a folder of its own put on PYTHONPATH only by the tests that train with it -----------
# (installed into the venv, mmengine imports it with every Runner: seconds per process for every test)
def _deepspeed_site():
    import re
    from pathlib import Path

    import tomllib

    repo = Path(__file__).resolve().parents[1]
    constraints = repo / "requirements" / "constraints.txt"
    version = re.search(r"^deepspeed==(\S+)", constraints.read_text(), re.M).group(1)
    site = Path(os.environ.get("RAT_DEEPSPEED_SITE", Path.home() / ".cache" / "rat-plugins" / f"deepspeed-{version}"))
    # the whole extra, whatever this venv happens to hold: the folder is shared by every checkout's venv
    extra = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["optional-dependencies"]["deepspeed"]
    wanted = " ".join(sorted(extra)) + f" {version}"
    stamp = site / ".complete"
    with _InstallLock(site):
        if not stamp.is_file() or stamp.read_text() != wanted:
            _install_deepspeed(site, extra, constraints, wanted)
    return site


def _install_deepspeed(site, extra, constraints, wanted):
    """pip --target the DeepSpeed extra into ``site``, check that it imports, then stamp it."""
    import subprocess
    import sys

    stamp = site / ".complete"
    print(f"installing {' '.join(extra)} into {site} (DeepSpeed's ops left to JIT)", file=sys.stderr)
    step = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    step += ["--upgrade", "--no-build-isolation", "--target", str(site), "-c", str(constraints), *extra]
    env = dict(os.environ, DS_BUILD_OPS="0")
    proc = subprocess.run(step, capture_output=True, text=True, timeout=1200, env=env)
    if proc.returncode != 0:
        pytest.fail(f"cannot install DeepSpeed into {site}: {proc.stderr[-2000:]}")
    check = subprocess.run(
        [sys.executable, "-c", "import deepspeed"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(site), DS_ACCELERATOR="cpu"),
    )
    if check.returncode != 0:
        pytest.fail(f"DeepSpeed in {site} does not import with this venv: {check.stderr[-2000:]}")
    stamp.write_text(wanted)


@pytest.fixture(scope="session")
def deepspeed_env():
    """The environment of a process that has DeepSpeed installed (its folder first on PYTHONPATH)."""
    site = str(_deepspeed_site())
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": site + (os.pathsep + path if path else ""), "DS_ACCELERATOR": "cpu"}


# -- a real MLflow tracking server on 127.0.0.1, from the full mlflow package in a venv of its own --
def _mlflow_server_python():
    """The server venv's python (created once per version in ~/.cache/rat-plugins; the training venv has
    only the client, mlflow-skinny, at the same version)."""
    import re
    from pathlib import Path

    constraints = (Path(__file__).resolve().parents[1] / "requirements" / "constraints.txt").read_text()
    version = re.search(r"^mlflow-skinny==(\S+)", constraints, re.M).group(1)
    venv = Path(
        os.environ.get("RAT_MLFLOW_SERVER_VENV", Path.home() / ".cache" / "rat-plugins" / f"mlflow-server-{version}")
    )
    python = venv / "bin" / "python"
    with _InstallLock(venv):
        _install_mlflow_server(venv, python, version)
    return python


def _install_mlflow_server(venv, python, version):
    """A venv with the full mlflow package at ``version`` (stamped when complete)."""
    import subprocess
    import sys

    if not (venv / ".complete").is_file():
        print(f"installing mlflow {version} for the test tracking server into {venv}", file=sys.stderr)
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"mlflow=={version}"],
        ]
        for step in steps:
            proc = subprocess.run(step, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                pytest.fail(f"cannot install the MLflow server ({' '.join(step[:4])}...): {proc.stderr[-2000:]}")
        (venv / ".complete").write_text(version)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """The URI of a running ``mlflow server`` (sqlite store, artifacts proxied) on 127.0.0.1; stopped at the end."""
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    python = _mlflow_server_python()
    folder = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        str(python),
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder}/server.db",
        "--artifacts-destination",
        str(folder / "artifacts"),
    ]
    log = open(folder / "server.log", "w")
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).read().strip() == b"OK":
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
