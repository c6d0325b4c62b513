#!/usr/bin/env bash
# Run one OFAT experiment through tools/lazyconfig_train_net.py.
#
#   ./run_single_ofat.sh NAME [--quick] [--background] [--num-gpus N] [--micro-batch K] [key=value ...]
#
# NAME is a file of projects/ViTDet/configs/OFAT/ (with or without .py). Output goes to
# work_dirs/ofat_NAME/ (work_dirs/ofat_NAME_quick/ with --quick): log.txt, metrics.json,
# TensorBoard events, model_XXXXXXX.pth, model_final.pth, final_metrics.json. A directory that
# already holds a checkpoint is resumed. --background detaches the run, writes run.pid and
# run.log there and prints how to follow it. RAT_WORK_DIRS moves work_dirs/ elsewhere.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG_DIR="$REPO/projects/ViTDet/configs/OFAT"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python

usage() { sed -n '2,/^set /{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
NAME="${1%.py}"; shift
CONFIG="$CONFIG_DIR/$NAME.py"
if [ ! -f "$CONFIG" ]; then
  echo "error: no OFAT config named '$NAME'. Available:" >&2
  ls "$CONFIG_DIR" | sed 's/\.py$//; s/^/  /' >&2
  exit 2
fi

QUICK=0; BACKGROUND=0; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --background) BACKGROUND=1 ;;
    --num-gpus|--micro-batch|--num-machines|--machine-rank|--dist-url) EXTRA+=("$1" "$2"); shift ;;
    *) EXTRA+=("$1") ;;
  esac
  shift
done

OUT="${RAT_WORK_DIRS:-$REPO/work_dirs}/ofat_$NAME"
OVERRIDES=()
if [ "$QUICK" = 1 ]; then
  OUT="${OUT}_quick"
  # the quick-mode overrides are one Python list (rat_plugins.experiments.ofat.quick_overrides)
  QUICK_LIST="$(cd "$REPO" && "$PY" -m rat_plugins.experiments.ofat quick-overrides)"
  while IFS= read -r line; do
    if [ -n "$line" ]; then OVERRIDES+=("$line"); fi
  done <<<"$QUICK_LIST"
fi
mkdir -p "$OUT"
RESUME=()
if [ -f "$OUT/last_checkpoint" ]; then
  echo "resuming from $(cat "$OUT/last_checkpoint") in $OUT"
  RESUME=(--resume)
fi
# ${a[@]+"${a[@]}"}: an empty array expands to nothing (bash < 4.4 calls it unbound under set -u)
CMD=("$PY" "$REPO/tools/lazyconfig_train_net.py" --config-file "$CONFIG" ${RESUME[@]+"${RESUME[@]}"})
# CLI flags first, then key=value overrides (the user's last, so they win).
FLAGS=(); KV=()
for a in ${EXTRA[@]+"${EXTRA[@]}"}; do case "$a" in *=*) KV+=("$a") ;; *) FLAGS+=("$a") ;; esac; done
CMD+=(${FLAGS[@]+"${FLAGS[@]}"} ${OVERRIDES[@]+"${OVERRIDES[@]}"} "train.output_dir=$OUT" ${KV[@]+"${KV[@]}"})

if [ "$BACKGROUND" = 1 ]; then
  nohup "${CMD[@]}" >"$OUT/run.log" 2>&1 &
  echo $! >"$OUT/run.pid"
  echo "started $NAME in the background (pid $(cat "$OUT/run.pid")); follow it with: tail -f $OUT/run.log"
else
  cd "$REPO"
  "${CMD[@]}"
fi
