#!/usr/bin/env bash
# One-command set-up of the rat-plugins stack into .venv/ at the repository root.
#
# What gets installed is pyproject.toml's dependency lists (every extra but `cuda`), at the
# versions pinned in requirements/constraints.txt.
#
# Idempotent: a finished install leaves a stamp (hash of the pins, pyproject.toml and these
# scripts); a later run with the same stamp checks the imports and installs nothing.  Safe to
# interrupt: every step checks what is already there, the mmcv wheel is built in a temporary
# folder and renamed into the cache only when complete, and the stamp is written last.
#
# The mmcv wheel cache is keyed by what makes a wheel incompatible: Python ABI, torch version
# with its local tag, and CPU-only or CUDA ops (CUDA when torch sees a GPU and a matching nvcc
# exists; then also the CUDA release and architectures) -- a wheel built on a CPU login node is
# never installed on a GPU node. Set-ups running at once (two jobs, one home folder) take turns:
# one lock per checkout, one per cache key around the build and its copy into the cache; the
# second waits and says so. The build prints its progress (objects compiled / total) every 30 s.
#
# Environment:
#   RAT_PLUGINS_PYTHON       interpreter for the venv (default: python3.11, else python3)
#   RAT_PLUGINS_WHEEL_CACHE  where the compiled mmcv wheel is kept (default ~/.cache/rat-plugins/wheels)
#   RAT_PLUGINS_SKIP_DETECTRON2=1  do not install the detectron2 redistribution
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PY="$VENV/bin/python"
CONSTRAINTS="$REPO/requirements/constraints.txt"
PYPROJECT="$REPO/pyproject.toml"
WHEEL_CACHE="${RAT_PLUGINS_WHEEL_CACHE:-$HOME/.cache/rat-plugins/wheels}"
STAMP="$VENV/.rat-plugins-install-stamp"
# shellcheck source=tools/_install_lib.sh
. "$REPO/tools/_install_lib.sh"

MMCV_VERSION=2.1.0
D2_WHEEL=sal_detectron2-0.7.2-cp310-none-any.whl
D2_SHA256=491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561

STEP="starting"
HINT=""
step() { STEP="$1"; HINT="${2:-}"; echo "==> [install] $STEP"; }
fail() {
  echo "!!! [install] step failed: $STEP" >&2
  [ -n "$HINT" ] && echo "!!! what to do: $HINT" >&2
  echo "!!! re-running 'make test' (or tools/install.sh) resumes from this step." >&2
  exit 1
}
# pip with the constraints file. Noise filtered out: the site's find-links warnings, and pip's
# resolver note about the detectron2 redistribution's metadata pins (numpy<2, black), which are
# not real runtime needs. Real errors still show and fail the step.
pip_install() {
  "$PY" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS" "$@" 2>&1 \
    | grep -vE "^WARNING: Location 'file:|^ERROR: pip's dependency resolver does not currently|^This behaviour is the source of the following|^sal-detectron2 0.7.2 requires" ; return "${PIPESTATUS[0]}"
}
stamp_value() {
  cat "$CONSTRAINTS" "$PYPROJECT" "$REPO/tools/install.sh" "$REPO/tools/_install_lib.sh" | sha256sum | cut -d' ' -f1
}
# sets MMCV_KIND / MMCV_KEY / MMCV_ARCHS / MMCV_NOTE / MMCV_CUDA_HOME (tools/_install_lib.sh)
plan_mmcv_build() {
  local facts
  MMCV_CUDA_HOME="$(cuda_home)"
  facts="$(torch_build_facts "$PY" 2>/dev/null)" || return 1
  mmcv_build_plan "$facts" "$(nvcc_release "${MMCV_CUDA_HOME:+$MMCV_CUDA_HOME/bin/nvcc}")"
}
# pyproject.toml's requirements (core + the extras below), one per line, less those that later
# steps install themselves: torch first, mmcv compiled, mmdet / mmseg without their pins.
project_requirements() {
  "$PY" - "$PYPROJECT" <<'EOF'
import re, sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's own copy of tomli
    from pip._vendor import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
extras = ("mm", "detectron2", "rat", "events", "tracking", "ray", "test")
own_steps = {"torch", "torchvision", "mmcv", "mmdet", "mmsegmentation"}
seen = set()
for req in project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]:
    name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", req).group(0)).lower()
    if name not in own_steps and name not in seen:
        seen.add(name)
        print(req)
EOF
}
stack_imports_ok() {
  "$PY" - <<'EOF' >/dev/null 2>&1 && mmcv_ops_ok "$PY" "${MMCV_KIND:-cpu}"
import os, torch, mmcv, mmengine, mmdet, mmseg, rat_plugins
if os.environ.get("RAT_PLUGINS_SKIP_DETECTRON2", "0") != "1":
    import detectron2
EOF
}

# -- one set-up per checkout at a time (a lock on this script's file: nothing new to clean up) ----
exec 8<"$REPO/tools/install.sh"
if ! flock -n 8; then
  echo "==> [install] another tools/install.sh is running in $REPO; waiting for it to finish"
  flock 8
fi

# -- 0. already done? ---------------------------------------------------------------------------
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_value)" ] && plan_mmcv_build \
    && stack_imports_ok; then
  echo "==> [install] environment up to date ($VENV); nothing to install"
  exit 0
fi

# -- 1. virtual environment ---------------------------------------------------------------------
step "virtual environment at .venv" "install Python 3.11 with venv support (apt-get install python3.11-venv) or set RAT_PLUGINS_PYTHON"
if ! { [ -x "$PY" ] && "$PY" -c "import sys, pip; assert sys.version_info[:2] >= (3, 10)" 2>/dev/null; }; then
  BASE_PY="${RAT_PLUGINS_PYTHON:-$(command -v python3.11 || command -v python3)}"
  [ -n "$BASE_PY" ] || fail
  rm -rf "$VENV"
  "$BASE_PY" -m venv "$VENV" || fail
fi
"$PY" -c "import sys; print('    python', sys.version.split()[0])"

# -- 2. torch -----------------------------------------------------------------------------------
step "torch and torchvision (pinned)" "check that pip can reach the package registry and that the disk has ~6 GB free"
pip_install torch torchvision || fail

# -- 3. build tools: detectron2's model_zoo and mmengine import pkg_resources (gone from setuptools
# >= 81) and torch 2.14 asks for setuptools >= 77: the pin is 80.x --------------------------------
step "build tools (setuptools 80 with pkg_resources, wheel, ninja)"
pip_install setuptools wheel ninja || fail

# -- 4. pure-Python dependencies ----------------------------------------------------------------
step "dependencies (pyproject.toml)" "see the pip error above; versions are pinned in requirements/constraints.txt"
REQS="$(project_requirements)" || { HINT="pyproject.toml could not be read: check its syntax"; fail; }
mapfile -t REQ_LIST <<<"$REQS"
pip_install "${REQ_LIST[@]}" || fail

# -- 5. mmcv with compiled ops, built once per cache key into the wheel cache --------------------
step "mmcv $MMCV_VERSION with compiled ops" "the build needs g++ and about 20-40 minutes on 2 cores; its log is kept in the cache folder"
plan_mmcv_build || { HINT="torch does not import: re-run to reinstall it"; fail; }
echo "    $MMCV_KIND ops ($MMCV_NOTE); wheel cache key $MMCV_KEY"
MMCV_CACHE="$WHEEL_CACHE/mmcv-$MMCV_VERSION/$MMCV_KEY"
mmcv_ok() { "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null && mmcv_ops_ok "$PY" "$MMCV_KIND"; }
cached_wheel() { ls "$MMCV_CACHE"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1; }
if mmcv_ok; then
  echo "    mmcv $MMCV_VERSION already installed"
else
  mkdir -p "$MMCV_CACHE" || fail
  WHEEL="$(cached_wheel)"
  if [ -z "$WHEEL" ]; then
    # one build per key at a time; whoever waited finds the other's wheel and builds nothing
    cache_lock_acquire "$MMCV_CACHE/.build.lock" "building mmcv into $MMCV_CACHE" || fail
    WHEEL="$(cached_wheel)"
  fi
  if [ -z "$WHEEL" ]; then
    rm -rf "$MMCV_CACHE"/.build-*  # left by a killed build; under the lock no other build runs here
    BUILD_DIR="$(mktemp -d "$MMCV_CACHE/.build-XXXXXX")" || fail
    # an interrupted build leaves no half-built folder and no progress loop behind (the next run
    # starts the build anew)
    trap 'build_progress_stop; rm -rf "$BUILD_DIR"' EXIT
    trap 'exit 130' INT TERM
    echo "    building mmcv from source in $BUILD_DIR (log: $MMCV_CACHE/build.log)"
    "$PY" -m pip download --disable-pip-version-check -q --no-deps --no-binary=:all: \
      "mmcv==$MMCV_VERSION" -d "$BUILD_DIR/src" 2>&1 | grep -v "^WARNING: Location 'file:"
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail
    # mmcv 2.1.0's setup.py needs an older setuptools (pkg_resources API of < 70) while it builds.
    "$PY" -m pip install --disable-pip-version-check -q "setuptools<70" 2>&1 | grep -v "^WARNING: Location 'file:"
    # torch >= 2.10 headers need C++20; mmcv's setup.py forces -std=c++17 (see cxx20_wrapper.sh,
    # which rewrites the flag for g++ and, in a CUDA build, for nvcc). mmcv's setup.py builds CUDA
    # ops whenever torch sees a GPU: a CPU build hides the GPUs.
    if [ "$MMCV_KIND" = cuda ]; then
      BUILD_ENV=(FORCE_CUDA=1 "CUDA_HOME=$MMCV_CUDA_HOME" "TORCH_CUDA_ARCH_LIST=$MMCV_ARCHS"
        "PYTORCH_NVCC=env RAT_REAL_CXX=$MMCV_CUDA_HOME/bin/nvcc $REPO/tools/cxx20_wrapper.sh")
    else
      BUILD_ENV=(FORCE_CUDA=0 CUDA_VISIBLE_DEVICES=)
    fi
    BUILD_START="$(date +%s)"
    build_progress_start "$MMCV_CACHE/build.log"
    if ! env MMCV_WITH_OPS=1 "${BUILD_ENV[@]}" MAX_JOBS="$(nproc)" CXX="$REPO/tools/cxx20_wrapper.sh" \
        "$PY" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps -v \
        -w "$BUILD_DIR/out" "$BUILD_DIR"/src/mmcv-*.tar.gz >"$MMCV_CACHE/build.log" 2>&1; then
      build_progress_stop
      tail -n 30 "$MMCV_CACHE/build.log"
      pip_install setuptools
      fail
    fi
    build_progress_stop
    echo "    mmcv built in $((($(date +%s) - BUILD_START) / 60)) min"
    pip_install setuptools || fail  # back to the pinned version
    BUILT="$(ls "$BUILD_DIR"/out/mmcv-*.whl | head -n1)"
    mv "$BUILT" "$MMCV_CACHE/" || fail  # a rename in one folder: the cache never holds half a wheel
    rm -rf "$BUILD_DIR"
    trap - EXIT INT TERM
    WHEEL="$MMCV_CACHE/$(basename "$BUILT")"
  fi
  cache_lock_release
  echo "    installing $WHEEL"
  # --force-reinstall: the same version built for other ops (CPU vs CUDA) is another wheel
  pip_install --no-deps --force-reinstall "$WHEEL" || fail
  mmcv_ok || { HINT="delete $MMCV_CACHE and re-run to rebuild the wheel"; fail; }
fi

# -- 6. mmdet / mmseg (no deps: they would replace our mmcv build) -----------------------------
step "mmdet and mmsegmentation"
pip_install --no-deps mmdet mmsegmentation || fail

# -- 7. detectron2 ------------------------------------------------------------------------------
step "detectron2" "build detectron2 from source into .venv yourself, or set RAT_PLUGINS_SKIP_DETECTRON2=1"
if "$PY" -c "import detectron2" 2>/dev/null; then
  echo "    detectron2 already importable: keeping it"
elif [ "${RAT_PLUGINS_SKIP_DETECTRON2:-0}" = 1 ]; then
  echo "    skipped (RAT_PLUGINS_SKIP_DETECTRON2=1)"
else
  # The only registry build with sources is a redistribution tagged cp310 but pure Python in
  # practice; its compiled _C does not load on 3.11 and detectron2 falls back without it.
  D2_DIR="$WHEEL_CACHE/detectron2"
  mkdir -p "$D2_DIR" || fail
  if [ ! -f "$D2_DIR/$D2_WHEEL" ]; then
    TMP_D2="$(mktemp -d "$D2_DIR/.dl-XXXXXX")" || fail
    "$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
      --python-version 3.10 sal-detectron2==0.7.2 -d "$TMP_D2" 2>&1 | grep -v "^WARNING: Location 'file:"
    [ "${PIPESTATUS[0]}" -eq 0 ] || fail
    mv "$TMP_D2/$D2_WHEEL" "$D2_DIR/$D2_WHEEL" && rm -rf "$TMP_D2" || fail
  fi
  echo "$D2_SHA256  $D2_DIR/$D2_WHEEL" | sha256sum -c --quiet - \
    || { HINT="checksum mismatch: delete $D2_DIR and re-run"; fail; }
  PURE="$D2_DIR/${D2_WHEEL/cp310-none-any/py3-none-any}"
  cp "$D2_DIR/$D2_WHEEL" "$PURE.tmp" && mv "$PURE.tmp" "$PURE" || fail
  pip_install --no-deps "$PURE" || fail
fi

# -- 8. the project itself ----------------------------------------------------------------------
step "rat-plugins (editable)"
pip_install --no-deps --no-build-isolation -e "$REPO" || fail

# -- 9. check -----------------------------------------------------------------------------------
step "checking the stack (imports, mmcv.ops.nms)" "run: $PY -c 'import mmcv.ops, detectron2, mmseg, mmdet' to see the error"
stack_imports_ok || fail
stamp_value >"$STAMP.tmp" && mv "$STAMP.tmp" "$STAMP"
echo "==> [install] done: $VENV"
