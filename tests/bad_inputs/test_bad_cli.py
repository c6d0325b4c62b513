"""Bad command lines of the shell CLIs and a broken framework under ``python -m rat_plugins list``.

Every usage error is one ``error: ...`` line naming the option or value, then one ``usage:`` line,
exit status 2, and nothing written.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from _helpers import REPO, run_cmd

BASELINE = "baseline_lr0.001_bs8_adamw_ep100"
SHELL_CLIS = (
    "run_single_ofat.sh",
    "run_all_ofat.sh",
    "tools/dist_train.sh",
    "tools/run_tests.sh",
    "tools/install.sh",
    "tools/_install_lib.sh",
)


def usage_error(args, tmp_path, env=None):
    """Run a shell CLI that must refuse its command line; return its ``error:`` line."""
    work = tmp_path / "work"
    proc = run_cmd(args, env={"RAT_WORK_DIRS": str(work), **(env or {})}, check=False, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("usage: "), proc.stderr
    assert "unbound variable" not in proc.stderr
    assert not work.exists() or not list(work.rglob("*")), list(work.rglob("*"))  # nothing written
    return lines[0]


# -- run_single_ofat.sh ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, named",
    [
        (["--num-gpus"], "--num-gpus needs a value"),  # before: "$2: unbound variable"
        (["--num-gpus", "--quick"], "--num-gpus needs a value"),  # before: --quick taken as the count
        (["--micro-batch"], "--micro-batch needs a value"),
        (["--foo"], "unknown option '--foo'"),  # before: passed on, argparse error after start-up
        (["--num-gpus", "two"], "--num-gpus needs a whole number >= 1, got 'two'"),
        (["--num-gpus=0"], "--num-gpus needs a whole number >= 1, got '0'"),
        (["--machine-rank", "-1"], "--machine-rank needs a whole number >= 0, got '-1'"),
        (["--quick=yes"], "--quick takes no value"),
        (["extra_word"], "unexpected argument 'extra_word'"),
    ],
)
def test_run_single_rejects_bad_options(tmp_path, args, named):
    line = usage_error(["./run_single_ofat.sh", BASELINE, *args], tmp_path)
    assert named in line


def test_run_single_without_a_name_lists_the_names(tmp_path):
    line = usage_error(["./run_single_ofat.sh", "--quick"], tmp_path)
    assert "no experiment name given" in line and BASELINE in line


def test_run_single_unknown_name(tmp_path):
    proc = run_cmd(["./run_single_ofat.sh", "baseline_lr0.1_bs8"], env={"RAT_WORK_DIRS": str(tmp_path)}, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no OFAT config named 'baseline_lr0.1_bs8'") and BASELINE in proc.stderr
    assert not list(tmp_path.iterdir())


def test_run_single_passes_options_and_overrides_through(tmp_path):
    proc = run_cmd(
        ["./run_single_ofat.sh", "--num-gpus=2", BASELINE, "--dry-run", "--micro-batch", "4", "--eval-only", "a.b=1"],
        env={"RAT_WORK_DIRS": str(tmp_path)},
    )
    command = proc.stdout.split()
    assert command[command.index("--num-gpus") + 1] == "2" and command[command.index("--micro-batch") + 1] == "4"
    assert "--eval-only" in command and command[-1] == "a.b=1"  # the user's override last
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


# -- run_all_ofat.sh -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, named",
    [
        (["--num-gpus"], "--num-gpus needs a value"),
        (["--foo"], "unknown option '--foo'"),  # before: nine runs started, nine failures
        (["--num-gpus", "two"], "--num-gpus needs a whole number >= 1, got 'two'"),
        ([BASELINE], f"unexpected argument '{BASELINE}'"),
        (["--background"], "--background is an option of run_single_ofat.sh only"),
        (["--yes"], "--yes only goes with --clean"),
        (["--clean", "--quick"], "--clean takes no other option than --yes"),
    ],
)
def test_run_all_rejects_bad_options_before_any_run(tmp_path, args, named):
    line = usage_error(["./run_all_ofat.sh", *args], tmp_path)
    assert named in line


# -- tools/dist_train.sh ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mm_config():
    """Any mmseg config: the arguments are refused before it is read."""
    return str(sorted((REPO / "projects" / "SETR" / "configs").glob("*.py"))[0].relative_to(REPO))


@pytest.mark.parametrize(
    "args, env, named",
    [
        ([], {}, "no CONFIG given"),
        (["--foo"], {}, "expected CONFIG first, got option '--foo'"),
        (["{config}"], {}, "no GPUS given"),
        (["{config}", "two"], {}, "GPUS must be a whole number >= 1, got 'two'"),
        (["missing_config.py", "2"], {}, "config file not found: missing_config.py"),
        (["{config}", "2"], {"PORT": "http"}, "PORT must be a whole number >= 1, got 'http'"),
        (["{config}", "2"], {"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK (2) must be below NNODES (2)"),
        (["{config}", "2", "--launcher", "none"], {}, "sets --launcher pytorch itself"),
    ],
)
def test_dist_train_rejects_bad_arguments(tmp_path, mm_config, args, env, named):
    line = usage_error(["tools/dist_train.sh", *(a.format(config=mm_config) for a in args)], tmp_path, env)
    assert named in line


@pytest.mark.parametrize(
    "args, named",
    [(["--work-dir"], "argument --work-dir: expected one argument"), (["--foo"], "unrecognized arguments: --foo")],
)
def test_dist_train_checks_train_py_arguments_once_before_starting(tmp_path, mm_config, args, named):
    # before: torchrun started GPUS processes, each failing with its own argparse error
    line = usage_error(["tools/dist_train.sh", mm_config, "2", *args], tmp_path)
    assert named in line


# -- bash 4.2 -------------------------------------------------------------------------------------------

# features newer than bash 4.2: negative array indices, mapfile -d, wait -n, namerefs, ${var@Q},
# $EPOCHSECONDS / $EPOCHREALTIME
NEWER_BASH = re.compile(
    r"\$\{\w+\[-\d+\]\}|mapfile\s+-d|readarray\s+-d|wait\s+-n|(local|declare)\s+-n\b|\$\{\w+@[QEPAa]\}|EPOCH(SECONDS|REALTIME)"
)


@pytest.mark.parametrize("script", SHELL_CLIS)
def test_scripts_use_nothing_newer_than_bash_4_2(script):
    text = (REPO / script).read_text()
    assert not NEWER_BASH.findall(text)
    assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)"
)
def test_scripts_pass_shellcheck():
    proc = subprocess.run(
        ["shellcheck", "-S", "warning", *(str(REPO / s) for s in SHELL_CLIS)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


# -- python -m rat_plugins list with a broken framework ------------------------------------------------


def _list_with_fake_module(tmp_path, name, raise_line):
    """``python -m rat_plugins list`` where importing ``name`` runs ``raise_line``."""
    fake = tmp_path / "fake_site" / name
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(raise_line + "\n")
    path = os.pathsep.join(p for p in (str(tmp_path / "fake_site"), os.environ.get("PYTHONPATH")) if p)
    return run_cmd([sys.executable, "-m", "rat_plugins", "list"], env={"PYTHONPATH": path}, check=False)


def test_list_reports_mmseg_refusing_the_installed_mmcv(tmp_path):
    proc = _list_with_fake_module(
        tmp_path,
        "mmseg",
        'raise AssertionError("MMCV==2.2.0 is used but incompatible. Please install mmcv>=2.0.0rc4, <2.2.0.")',
    )
    assert proc.returncode == 0, proc.stderr  # before: a traceback from the AssertionError
    assert "Traceback" not in proc.stderr
    rows = proc.stdout.splitlines()
    unavailable = rows[rows.index("unavailable:") + 1 :]
    (mmseg,) = [r for r in unavailable if r.strip().startswith("mmseg:")]
    assert "AssertionError: MMCV==2.2.0 is used but incompatible" in mmseg
    assert "to fix:" in mmseg and "mmcv 2.1.0" in mmseg and "make install" in mmseg
    assert any(r.strip().startswith("mmdet:") and "rat_plugins.mm" in r for r in unavailable)
    assert any(r.startswith("detectron2 BACKBONE_REGISTRY: ") for r in rows)  # the rest is still listed
    assert "FutureWarning" not in proc.stderr  # before: two torch.jit.script warnings above the table


def test_list_reports_a_broken_detectron2(tmp_path):
    proc = _list_with_fake_module(tmp_path, "detectron2", 'raise RuntimeError("compiled for another torch")')
    assert proc.returncode == 0, proc.stderr
    assert "detectron2: cannot be imported (RuntimeError: compiled for another torch); to fix: " in proc.stdout
    # mmdet imports detectron2 when it is installed, so the mm adapters fail too: the line says why
    assert "mmdet: its adapter rat_plugins.mm cannot be imported: `detectron2` fails at import" in proc.stdout


def test_list_unknown_command():
    proc = run_cmd([sys.executable, "-m", "rat_plugins", "lst"], check=False)
    assert proc.returncode == 2 and "invalid choice: 'lst'" in proc.stderr
