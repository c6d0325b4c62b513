"""The package's boundaries: importing without frameworks, pure models, clear adapter errors."""

import ast
import subprocess
import sys

from _helpers import REPO, run_cmd

FRAMEWORKS = ("detectron2", "mmdet", "mmseg", "mmengine", "mmcv")


def _blocked_import(code):
    """Run code in a fresh interpreter where the frameworks cannot be imported."""
    prelude = f"import sys\nfor m in {FRAMEWORKS!r}: sys.modules[m] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=REPO)


def test_import_needs_no_framework():
    proc = _blocked_import(
        "import rat_plugins, rat_plugins.data, rat_plugins.engine.schedule\n"
        "import rat_plugins.models, rat_plugins.data.roboflow\nprint('ok')"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_adapter_without_framework_gives_one_clear_error():
    for adapter, framework in (("rat_plugins.detectron2", "detectron2"), ("rat_plugins.mm", "mm")):
        proc = _blocked_import(f"import {adapter}")
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError:"), last
        assert adapter in last and framework in last and "make install" in last, last


def test_models_import_no_framework():
    offenders = []
    for path in (REPO / "rat_plugins" / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in FRAMEWORKS]
    assert not offenders, offenders


def test_list_shows_registries_and_unavailable_pieces():
    proc = run_cmd([sys.executable, "-m", "rat_plugins", "list"])
    out = proc.stdout
    assert "FutureWarning" not in proc.stderr  # fvcore's torch.jit.script warnings are hidden
    assert "detectron2 BACKBONE_REGISTRY: " in out and "build_vim_backbone" in out
    assert "mmseg MODELS: " in out and "mmdet MODELS: " in out
    assert "unavailable:" in out
    assert "mamba_ssm" in out  # CUDA-only, never importable on the CPU machines


def test_tools_dir_is_not_a_package():
    # detectron2's wheel installs a top-level `tools` package; ours must not shadow it.
    assert not (REPO / "tools" / "__init__.py").exists()


def test_install_is_idempotent():
    # `make test` ran tools/install.sh just before the suite: a second run must install nothing.
    proc = run_cmd(["bash", "tools/install.sh"])
    assert "nothing to install" in proc.stdout, proc.stdout
    assert "==> [install] torch" not in proc.stdout
