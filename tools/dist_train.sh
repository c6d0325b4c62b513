#!/usr/bin/env bash
# Multi-process training of an mmseg / mmdet config:
#
#   tools/dist_train.sh CONFIG GPUS [train.py arguments: --work-dir DIR --resume --amp --cfg-options k=v ...]
#
# GPUS: processes on this machine (a whole number >= 1). Multi-node: NNODES, NODE_RANK,
# MASTER_ADDR, PORT as in OpenMMLab's script. Without CUDA the processes train on CPU over gloo.
# PYTHON overrides the interpreter (default: .venv's, else python). The arguments are checked
# once, before any process starts.
set -euo pipefail
PROG="tools/dist_train.sh"
usage() { sed -n '2,/^set /{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
usage_error() {
  echo "error: $1" >&2
  echo "usage: $PROG CONFIG GPUS [--work-dir DIR] [--resume] [--amp] [--cfg-options k=v ...] (--help for more)" >&2
  exit 2
}
# need_count WHAT VALUE MIN
need_count() {
  case "$2" in
    '' | *[!0-9]*) usage_error "$1 must be a whole number >= $3, got '$2'" ;;
  esac
  [ "$((10#$2))" -ge "$3" ] || usage_error "$1 must be a whole number >= $3, got '$2'"
}

case "${1:-}" in -h | --help) usage; exit 0 ;; esac
[ $# -ge 1 ] || usage_error "no CONFIG given"
case "$1" in -*) usage_error "expected CONFIG first, got option '$1'" ;; esac
[ $# -ge 2 ] || usage_error "no GPUS given (the number of processes, e.g. $PROG $1 2)"
CONFIG=$1
GPUS=$2
shift 2
[ -f "$CONFIG" ] || usage_error "config file not found: $CONFIG"
need_count GPUS "$GPUS" 1
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
need_count NNODES "$NNODES" 1
need_count NODE_RANK "$NODE_RANK" 0
[ "$NODE_RANK" -lt "$NNODES" ] || usage_error "NODE_RANK ($NODE_RANK) must be below NNODES ($NNODES)"
need_count PORT "$PORT" 1
[ "$PORT" -le 65535 ] || usage_error "PORT must be a port number (1-65535), got '$PORT'"
for arg in ${1+"$@"}; do
  case "$arg" in
    --launcher | --launcher=*) usage_error "$PROG sets --launcher pytorch itself; drop '$arg'" ;;
  esac
done

HERE="$(cd "$(dirname "$0")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/../.venv/bin/python" ]; then PYTHON="$HERE/../.venv/bin/python"; else PYTHON=python; fi
fi
# train.py's own parser checks the rest (unknown option, missing value) once, here, instead of
# in every process torchrun starts; its "error:" line is reported with this script's usage.
if [ $# -gt 0 ]; then
  set +e
  check="$("$PYTHON" -c '
import sys
from rat_plugins.mm.runner import train_parser
train_parser().parse_args(sys.argv[1:])
' "$CONFIG" --launcher pytorch "$@" 2>&1 >/dev/null)"
  rc=$?
  set -e
  if [ "$rc" -eq 2 ]; then
    usage_error "$(printf '%s\n' "$check" | grep -m1 'error: ' | sed 's/^.*error: //')"
  elif [ "$rc" -ne 0 ]; then
    printf '%s\n' "$check" >&2
    echo "error: train.py's arguments could not be checked (see above); is the environment installed? (make install)" >&2
    exit 1
  fi
fi
# A stop signal goes to the training processes, not to torchrun's agent: they checkpoint at the next
# iteration and exit 0, and the agent then exits 0 too (signalled itself, it would exit 1 with a
# traceback and stop the workers before they save). The agent runs in a session of its own, so a
# terminal's Ctrl-C reaches this script only; the first SIGINT or SIGTERM is passed on as SIGTERM,
# a second SIGINT as SIGINT (the workers then stop at once, without a checkpoint).
setsid "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
  --nproc_per_node="$GPUS" --master_port="$PORT" \
  "$HERE/train.py" "$CONFIG" --launcher pytorch ${1+"$@"} &
agent=$!
stops=0
forward() { pkill "-$1" -P "$agent" 2>/dev/null || kill "-$1" "$agent" 2>/dev/null || true; }
on_stop() {
  stops=$((stops + 1))
  if [ "$1" = INT ] && [ "$stops" -gt 1 ]; then forward INT; else forward TERM; fi
}
trap 'on_stop TERM' TERM
trap 'on_stop INT' INT
trap 'forward USR1' USR1
trap 'forward USR2' USR2
# wait returns early (status > 128) when a trapped signal arrives: wait again until the agent ends
while :; do
  wait "$agent" && status=0 || status=$?
  kill -0 "$agent" 2>/dev/null || break
done
exit "$status"
