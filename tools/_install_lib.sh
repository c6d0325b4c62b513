# shellcheck shell=bash
# Functions of tools/install.sh that decide, guard and report the mmcv build (sourced, not run).
#
#   mmcv_build_plan FACTS NVCC_RELEASE  what to build and its wheel cache key
#   torch_build_facts PY, cuda_home, nvcc_release NVCC   the facts it needs
#   cache_lock_acquire LOCKFILE WHAT / cache_lock_release   one build per cache key at a time
#   build_progress_start LOG / build_progress_stop / build_progress_line LOG START   progress
#   mmcv_ops_ok PY KIND   the check after install: mmcv's nms on the CPU, and on the GPU for cuda
#
# Bash 4.2 compatible (tests/bad_inputs/test_bad_cli.py lists what newer bash features it avoids).

# "ABI TORCH_VERSION CUDA_AVAILABLE TORCH_CUDA ARCHS" of the interpreter PY, e.g.
# "cp311 2.14.1+cu130 0 13.0 none" (ARCHS: the visible GPUs' compute capabilities, 9.0;8.6).
torch_build_facts() {
  "$1" - <<'EOF'
import sys
import torch

abi = f"cp{sys.version_info[0]}{sys.version_info[1]}{getattr(sys, 'abiflags', '')}"
cuda = torch.cuda.is_available()
archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}) if cuda else []
print(abi, torch.__version__, int(cuda), torch.version.cuda or "none", ";".join(archs) or "none")
EOF
}

# mmcv_ops_ok PY KIND: mmcv's nms gives the right boxes on the CPU and, for KIND=cuda, on the GPU
# (a wheel with CPU ops only fails there: it is the wrong wheel for a GPU machine).
mmcv_ops_ok() {
  MMCV_KIND="$2" "$1" - <<'EOF' >/dev/null 2>&1
import os, torch
from mmcv.ops import nms
devices = ["cpu"] + (["cuda"] if os.environ["MMCV_KIND"] == "cuda" else [])
for device in devices:
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]], device=device)
    _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7], device=device), 0.5)
    assert keep.tolist() == [0, 2], (device, keep)
EOF
}

# The CUDA toolkit torch's extension builder would use: $CUDA_HOME / $CUDA_PATH, /usr/local/cuda,
# or the folder above nvcc on PATH; empty when none has bin/nvcc and include/cuda_runtime.h.
cuda_home() {
  local candidate nvcc
  nvcc="$(command -v nvcc 2>/dev/null || true)"
  for candidate in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda "${nvcc:+$(dirname "$(dirname "$nvcc")")}"; do
    if [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 0
}

# "13.0" for an nvcc (path) that reports "release 13.0"; empty without one.
nvcc_release() {
  [ -n "${1:-}" ] && [ -x "$1" ] || return 0
  "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p' | head -n1
}

# mmcv_build_plan FACTS NVCC_RELEASE: sets
#   MMCV_KIND   cpu | cuda: CUDA ops when torch sees a GPU and an nvcc of torch's CUDA major version
#               exists (torch refuses another); CPU ops otherwise
#   MMCV_ARCHS  the CUDA architectures to compile for ($TORCH_CUDA_ARCH_LIST, else the GPUs')
#   MMCV_KEY    everything that makes two wheels incompatible: Python ABI, torch version with its
#               local tag (+cu130, +cpu), cpu or cuda<release>-sm<archs>
#   MMCV_NOTE   why that kind, for the log
# shellcheck disable=SC2034  # the variables are the result, read by install.sh
mmcv_build_plan() {
  local abi torch_version cuda_available torch_cuda archs nvcc="${2:-}"
  read -r abi torch_version cuda_available torch_cuda archs <<<"$1"
  if [ -z "$abi" ] || [ -z "$torch_version" ] || [ -z "$archs" ]; then
    echo "mmcv_build_plan: cannot read the interpreter's facts from '$1'" >&2
    return 1
  fi
  MMCV_KIND=cpu
  MMCV_ARCHS=""
  if [ "$cuda_available" != 1 ]; then
    MMCV_NOTE="torch sees no GPU"
  elif [ -z "$nvcc" ]; then
    MMCV_NOTE="a GPU but no CUDA toolkit (nvcc): install it, or set CUDA_HOME, for mmcv's CUDA ops"
  elif [ "${nvcc%%.*}" != "${torch_cuda%%.*}" ]; then
    MMCV_NOTE="nvcc $nvcc does not match torch's CUDA $torch_cuda (torch refuses to build with it)"
  else
    MMCV_KIND=cuda
    MMCV_ARCHS="${TORCH_CUDA_ARCH_LIST:-$archs}"
    MMCV_NOTE="GPU and nvcc $nvcc: CUDA ops for compute capability $MMCV_ARCHS"
  fi
  MMCV_KEY="$abi-torch$torch_version-cpu"
  if [ "$MMCV_KIND" = cuda ]; then
    # "8.6;9.0+PTX" -> "sm8.6_9.0+PTX": one folder name
    MMCV_KEY="$abi-torch$torch_version-cuda$nvcc-sm$(printf '%s' "$MMCV_ARCHS" | tr '; ' '__')"
  fi
  return 0
}

# cache_lock_acquire LOCKFILE WHAT: hold an exclusive lock (fd 9) until cache_lock_release or
# exit. A second set-up waits, saying for what and for whom, every $RAT_PLUGINS_LOCK_POLL s.
cache_lock_acquire() {
  local lockfile="$1" what="$2" waited=0 poll="${RAT_PLUGINS_LOCK_POLL:-60}" holder
  exec 9>>"$lockfile" || return 1
  if ! flock -n 9; then
    holder="$(cat "$lockfile" 2>/dev/null)"
    echo "    waiting for another set-up (${holder:-pid unknown}) that is $what"
    until flock -w "$poll" 9; do
      waited=$((waited + poll))
      echo "    still waiting for the other set-up (${waited} s so far; lock: $lockfile)"
    done
  fi
  # the holder's name, for the message of whoever waits next (the lock is on the open file)
  printf 'pid %s on %s\n' "$$" "$(hostname 2>/dev/null || echo '?')" >"$lockfile"
  return 0
}

cache_lock_release() {
  flock -u 9 2>/dev/null
  exec 9>&-
  return 0
}

# build_progress_line LOG START: "mmcv build: 23/77 objects compiled, 6 min 12 s elapsed, about
# 14 min left" from the last ninja "[k/N]" line of LOG (START: the build's start, epoch seconds).
build_progress_line() {
  local log="$1" start="$2" now elapsed last done_count total
  now="$(date +%s)"
  elapsed=$((now - start))
  last="$(grep -oE '\[[0-9]+/[0-9]+\]' "$log" 2>/dev/null | tail -n1 | tr -d '[]')"
  if [ -z "$last" ]; then
    echo "    mmcv build: preparing (no object compiled yet), $((elapsed / 60)) min $((elapsed % 60)) s elapsed"
    return 0
  fi
  done_count="${last%/*}"
  total="${last#*/}"
  if [ "$done_count" -ge "$total" ]; then
    echo "    mmcv build: $done_count/$total objects compiled, linking; $((elapsed / 60)) min $((elapsed % 60)) s elapsed"
  else
    echo "    mmcv build: $done_count/$total objects compiled, $((elapsed / 60)) min $((elapsed % 60)) s elapsed," \
      "about $(((elapsed * (total - done_count) / done_count + 59) / 60)) min left"
  fi
  return 0
}

# build_progress_start LOG: a progress line every $RAT_PLUGINS_PROGRESS_INTERVAL s (30) until
# build_progress_stop; the loop also ends by itself when this shell is gone (Ctrl-C, kill).
BUILD_PROGRESS_PID=""
build_progress_start() {
  local log="$1" interval="${RAT_PLUGINS_PROGRESS_INTERVAL:-30}" parent="$$" start
  start="$(date +%s)"
  (
    me="$BASHPID"
    exec 8<&- 9>&-  # not the set-up's locks: a loop outliving a killed set-up must not hold them
    # sleep's output is not the pipe of whoever reads ours: a killed loop leaves no writer behind
    while sleep "$interval" >/dev/null 2>&1; do
      _parent_is_alive "$me" "$parent" || exit 0
      build_progress_line "$log" "$start"
    done
  ) &
  BUILD_PROGRESS_PID=$!
  return 0
}

# _parent_is_alive PID PARENT: PID's parent is still PARENT. A dead parent's children go to
# another process at once, while the dead one may linger as a zombie that kill -0 still finds.
_parent_is_alive() {
  local stat ppid
  if read -r stat <"/proc/$1/stat" 2>/dev/null; then
    read -r _ ppid _ <<<"${stat##*) }"
    [ "$ppid" = "$2" ]
  else
    kill -0 "$2" 2>/dev/null
  fi
}

build_progress_stop() {
  if [ -n "$BUILD_PROGRESS_PID" ]; then
    kill "$BUILD_PROGRESS_PID" 2>/dev/null
    wait "$BUILD_PROGRESS_PID" 2>/dev/null
    BUILD_PROGRESS_PID=""
  fi
  return 0
}
