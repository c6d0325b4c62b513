"""The set-up's pieces (tools/_install_lib.sh) under bad conditions, tested with fakes: wheel cache
keys that must differ, two set-ups at once, a build that must show progress, a broken import.

tools/install.sh itself is not run here: it would reinstall into the .venv the tests run from.
"""

import subprocess
import sys
import time

import pytest

from rat_plugins._optional import require

from _helpers import REPO

LIB = REPO / "tools" / "_install_lib.sh"
CPU_NODE = "cp311 2.14.1+cu130 0 13.0 none"
GPU_NODE = "cp311 2.14.1+cu130 1 13.0 9.0"


def lib(script, env=None, timeout=60, **kwargs):
    """Run ``script`` in bash with tools/_install_lib.sh sourced, under ``set -u``."""
    return subprocess.run(
        ["bash", "-c", f'set -u; . "{LIB}"; {script}'],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        **kwargs,
    )


def plan(facts, nvcc, env=None):
    proc = lib(f'mmcv_build_plan "{facts}" "{nvcc}" && printf "%s\\n" "$MMCV_KIND" "$MMCV_KEY" "$MMCV_NOTE"', env)
    assert proc.returncode == 0, proc.stderr
    kind, key, note = proc.stdout.splitlines()
    return kind, key, note


# -- the wheel cache key --------------------------------------------------------------------------


def test_cpu_login_node_and_gpu_node_get_different_wheels():
    cpu_kind, cpu_key, _ = plan(CPU_NODE, "13.0")
    gpu_kind, gpu_key, note = plan(GPU_NODE, "13.0")
    assert (cpu_kind, cpu_key) == ("cpu", "cp311-torch2.14.1+cu130-cpu")
    assert (gpu_kind, gpu_key) == ("cuda", "cp311-torch2.14.1+cu130-cuda13.0-sm9.0")  # before: both torch-2.14.1
    assert "9.0" in note


@pytest.mark.parametrize(
    "facts",
    ["cp311 2.14.1+cpu 0 none none", "cp311 2.15.0+cu130 0 13.0 none", "cp310 2.14.1+cu130 0 13.0 none"],
    ids=["torch local tag", "torch version", "python abi"],
)
def test_key_covers_torch_build_and_python(facts):
    assert plan(facts, "13.0")[1] != plan(CPU_NODE, "13.0")[1]


def test_gpu_without_a_usable_nvcc_builds_cpu_ops_and_says_why():
    kind, key, note = plan(GPU_NODE, "")
    assert kind == "cpu" and key.endswith("-cpu") and "nvcc" in note and "CUDA_HOME" in note
    kind, _, note = plan(GPU_NODE, "12.4")  # torch refuses an nvcc of another CUDA major version
    assert kind == "cpu" and "nvcc 12.4 does not match torch's CUDA 13.0" in note


def test_arch_list_from_the_environment_is_in_the_key():
    kind, key, _ = plan(GPU_NODE, "13.0", env={"TORCH_CUDA_ARCH_LIST": "8.6;9.0+PTX"})
    assert kind == "cuda" and key.endswith("-sm8.6_9.0+PTX")


def test_unreadable_facts_fail_with_a_message():
    proc = lib('mmcv_build_plan "" "13.0"')
    assert proc.returncode == 1 and "cannot read the interpreter's facts" in proc.stderr


def test_facts_of_this_interpreter():
    proc = lib(f'torch_build_facts "{sys.executable}"')
    assert proc.returncode == 0, proc.stderr
    import torch

    abi, version, cuda, _, _ = proc.stdout.split()
    assert abi == f"cp{sys.version_info[0]}{sys.version_info[1]}" and version == torch.__version__
    assert cuda == str(int(torch.cuda.is_available()))


def test_check_after_install_runs_nms_on_the_gpu_for_cuda_ops():
    pytest.importorskip("mmcv.ops")
    import torch

    assert lib(f'mmcv_ops_ok "{sys.executable}" cpu').returncode == 0
    # a machine without CUDA cannot run it, so the check says no: it does ask the GPU
    if not torch.cuda.is_available():
        assert lib(f'mmcv_ops_ok "{sys.executable}" cuda').returncode == 1


# -- two set-ups at once ---------------------------------------------------------------------------


def test_second_setup_waits_for_the_first_build(tmp_path):
    lock = tmp_path / ".build.lock"
    script = (
        f'cache_lock_acquire "{lock}" "building mmcv into {tmp_path}"; echo "acquired $(date +%s.%N)"; '
        'sleep "$HOLD"; echo "released $(date +%s.%N)"; cache_lock_release'
    )
    first = subprocess.Popen(
        ["bash", "-c", f'. "{LIB}"; {script}'],
        stdout=subprocess.PIPE,
        text=True,
        env={"HOLD": "3", "PATH": "/usr/bin:/bin"},
    )
    deadline = time.time() + 20
    while time.time() < deadline and not (lock.exists() and "pid" in lock.read_text()):
        time.sleep(0.05)
    second = lib(script, env={"HOLD": "0", "RAT_PLUGINS_LOCK_POLL": "1"})
    first_out = first.communicate(timeout=30)[0]
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    waiting, *still, acquired, _ = second.stdout.splitlines()
    assert waiting.startswith(f"    waiting for another set-up (pid {first.pid} on ")
    assert f"building mmcv into {tmp_path}" in waiting
    assert still and all("still waiting" in line for line in still)  # a line per poll while it waits
    released_first = float(first_out.split("released ")[1])
    assert float(acquired.split()[1]) >= released_first  # one build at a time


def test_lock_is_free_again_when_the_holder_dies(tmp_path):
    lock = tmp_path / ".build.lock"
    killed = lib(f'cache_lock_acquire "{lock}" "building"; kill -9 $$')
    assert killed.returncode != 0
    start = time.time()
    again = lib(f'cache_lock_acquire "{lock}" "building" && echo got it', timeout=10)
    assert again.stdout.strip() == "got it" and time.time() - start < 5


# -- build progress -----------------------------------------------------------------------------------

BUILD_LOG = """  Running command python setup.py bdist_wheel
  [1/77] /repo/tools/cxx20_wrapper.sh -MMD -MF build/active_rotated_filter.o.d -c active_rotated_filter.cpp
  [2/77] /repo/tools/cxx20_wrapper.sh -MMD -MF build/assign_score_withk.o.d -c assign_score_withk.cpp
  [23/77] /repo/tools/cxx20_wrapper.sh -MMD -MF build/ball_query.o.d -c ball_query.cpp
"""


def test_progress_line_counts_objects_and_estimates_the_rest(tmp_path):
    log = tmp_path / "build.log"
    log.write_text(BUILD_LOG)
    start = int(time.time()) - 600
    line = lib(f'build_progress_line "{log}" {start}').stdout.strip()
    assert line.startswith("mmcv build: 23/77 objects compiled, 10 min 0 s elapsed") or "10 min 1 s" in line, line
    assert "about 24 min left" in line or "about 25 min left" in line, line  # 600 s * 54 / 23
    log.write_text("  Running command python setup.py bdist_wheel\n")
    assert "preparing (no object compiled yet)" in lib(f'build_progress_line "{log}" {start}').stdout
    log.write_text(BUILD_LOG + "  [77/77] c++ -shared -o _ext.so\n")
    assert "77/77 objects compiled, linking" in lib(f'build_progress_line "{log}" {start}').stdout
    assert "preparing" in lib(f'build_progress_line "{tmp_path / "absent.log"}" {start}').stdout


def test_progress_loop_reports_while_building_and_stops_with_it(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("")
    script = (
        f'build_progress_start "{log}"; pid=$BUILD_PROGRESS_PID; '
        f'for k in 1 2 3; do echo "  [$k/3] c++ -c f$k.cpp" >>"{log}"; sleep 1.1; done; '
        'build_progress_stop; echo "loop $pid"'
    )
    proc = lib(script, env={"RAT_PLUGINS_PROGRESS_INTERVAL": "1"}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    progress = [line for line in lines if line.startswith("    mmcv build: ")]
    assert len(progress) >= 2 and any("/3 objects compiled" in line for line in progress), lines
    pid = int(lines[-1].split()[1])
    time.sleep(0.2)
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0  # loop gone


def test_progress_loop_ends_when_the_setup_is_killed(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("")
    # the set-up dies without stopping its loop (kill -9: no trap runs)
    proc = lib(
        f'build_progress_start "{log}"; echo "$BUILD_PROGRESS_PID"; kill -9 $$',
        env={"RAT_PLUGINS_PROGRESS_INTERVAL": "0.2"},
        timeout=10,
    )
    pid = int(proc.stdout.split()[0])
    deadline = time.time() + 5
    while time.time() < deadline and subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode == 0:
        time.sleep(0.1)
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0


# -- the scripts and a broken import ------------------------------------------------------------------


def test_install_script_parses_and_uses_the_library():
    for script in ("tools/install.sh", "tools/_install_lib.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script
    text = (REPO / "tools" / "install.sh").read_text()
    assert '. "$REPO/tools/_install_lib.sh"' in text and "--force-reinstall" in text


def test_require_turns_any_import_failure_into_one_clear_error(tmp_path, monkeypatch):
    broken = tmp_path / "broken_dependency_for_test"
    broken.mkdir()
    (broken / "__init__.py").write_text('raise AssertionError("MMCV==2.2.0 is used but incompatible.")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as info:  # before: the AssertionError itself, from deep inside
        require("broken_dependency_for_test", "rat_plugins.some_adapter")
    message = str(info.value)
    assert "rat_plugins.some_adapter needs `broken_dependency_for_test`" in message
    assert "AssertionError: MMCV==2.2.0 is used but incompatible." in message
    assert "To fix: install the pinned versions" in message and "make install" in message


def test_progress_loop_of_a_killed_setup_holds_no_lock(tmp_path):
    lock, log, out = tmp_path / ".build.lock", tmp_path / "build.log", tmp_path / "out.txt"
    log.write_text("")
    with open(out, "w") as f:  # not a pipe: the orphaned loop keeps writing for a while
        subprocess.run(
            [
                "bash",
                "-c",
                f'. "{LIB}"; cache_lock_acquire "{lock}" building; build_progress_start "{log}"; '
                'echo "$BUILD_PROGRESS_PID"; kill -9 $$',
            ],
            stdout=f,
            env={"PATH": "/usr/bin:/bin", "RAT_PLUGINS_PROGRESS_INTERVAL": "30"},
            timeout=10,
        )
    loop_pid = int(out.read_text().split()[0])
    try:
        start = time.time()
        again = lib(f'cache_lock_acquire "{lock}" building && echo got it', timeout=10)
        assert again.stdout.strip() == "got it" and time.time() - start < 5  # before: waited for the loop
    finally:
        subprocess.run(["kill", str(loop_pid)], capture_output=True)
