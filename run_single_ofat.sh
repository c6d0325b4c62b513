#!/usr/bin/env bash
# Run one OFAT experiment through tools/lazyconfig_train_net.py.
#
#   ./run_single_ofat.sh NAME [--quick] [--background] [--dry-run] [--num-gpus N] [--micro-batch K]
#                        [--num-machines M --machine-rank R --dist-url URL] [--eval-only] [--resume]
#                        [key=value ...]
#
# NAME is a file of projects/ViTDet/configs/OFAT/ (with or without .py), or the path of another
# config file (the combined-best one that run_all_ofat.sh --with-best writes: its name is the file's
# name without .py). Output goes to
# work_dirs/ofat_NAME/ (work_dirs/ofat_NAME_quick/ with --quick): log.txt, metrics.json,
# TensorBoard events, model_XXXXXXX.pth, model_final.pth, final_metrics.json. A directory that
# already holds a checkpoint is resumed. --background detaches the run, writes run.pid and
# run.log there and prints how to follow it. --dry-run prints the training command and exits
# (nothing is written). Options also take the form --num-gpus=N. RAT_WORK_DIRS moves work_dirs/
# elsewhere.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG_DIR="$REPO/projects/ViTDet/configs/OFAT"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python
PROG="./run_single_ofat.sh"

usage() { sed -n '2,/^set /{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
# one "error: ..." line and the short usage, exit 2: the user's command line needs fixing
usage_error() {
  echo "error: $1" >&2
  echo "usage: $PROG NAME [--quick] [--background] [--dry-run] [--num-gpus N] [--micro-batch K] [key=value ...]" \
    "(--help for all options)" >&2
  exit 2
}
# need_count OPTION VALUE MIN: VALUE must be a whole number >= MIN (0 or 1)
need_count() {
  case "$2" in
    '' | *[!0-9]*) usage_error "$1 needs a whole number >= $3, got '$2' (e.g. $1 2)" ;;
  esac
  [ "$((10#$2))" -ge "$3" ] || usage_error "$1 needs a whole number >= $3, got '$2'"
}

NAME=""; CONFIG_FILE=""; QUICK=0; BACKGROUND=0; DRY_RUN=0; FLAGS=(); KV=()
while [ $# -gt 0 ]; do
  opt="$1"; value=""; inline=0
  case "$opt" in --*=*) value="${opt#*=}"; opt="${opt%%=*}"; inline=1 ;; esac
  case "$opt" in
    --num-gpus | --micro-batch | --num-machines | --machine-rank | --dist-url)
      if [ "$inline" = 0 ]; then
        # a missing value, also when the next word is another option: --num-gpus --quick
        if [ $# -lt 2 ] || [ "${2#--}" != "$2" ]; then
          usage_error "$opt needs a value (e.g. $opt $([ "$opt" = --dist-url ] && echo tcp://HOST:PORT || echo 2))"
        fi
        value="$2"; shift
      fi
      case "$opt" in
        --machine-rank) need_count "$opt" "$value" 0 ;;
        --dist-url) [ -n "$value" ] || usage_error "$opt needs a value (e.g. $opt tcp://HOST:PORT)" ;;
        *) need_count "$opt" "$value" 1 ;;
      esac
      FLAGS+=("$opt" "$value")
      ;;
    -h | --help | --quick | --background | --dry-run | --eval-only | --resume)
      [ "$inline" = 0 ] || usage_error "$opt takes no value (got '$1')"
      case "$opt" in
        -h | --help) usage; exit 0 ;;
        --quick) QUICK=1 ;;
        --background) BACKGROUND=1 ;;
        --dry-run) DRY_RUN=1 ;;
        *) FLAGS+=("$opt") ;;
      esac
      ;;
    -*) usage_error "unknown option '$opt'" ;;
    *=*) KV+=("$1") ;;
    *)
      [ -z "$NAME" ] || usage_error "unexpected argument '$1' after the experiment name '$NAME' (overrides are key=value)"
      NAME="${1%.py}"
      case "$1" in */*.py) [ -f "$1" ] && CONFIG_FILE="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" && NAME="$(basename "$1" .py)" ;; esac
      ;;
  esac
  shift
done

available_names() { for f in "$CONFIG_DIR"/*.py; do basename "$f" .py; done; }
if [ -z "$NAME" ]; then
  usage_error "no experiment name given; one of: $(available_names | paste -sd ' ' -)"
fi
CONFIG="${CONFIG_FILE:-$CONFIG_DIR/$NAME.py}"
if [ ! -f "$CONFIG" ]; then
  echo "error: no OFAT config named '$NAME'. Available:" >&2
  available_names | sed 's/^/  /' >&2
  exit 2
fi

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
RESUME=()
if [ -f "$OUT/last_checkpoint" ]; then
  echo "resuming from $(cat "$OUT/last_checkpoint") in $OUT"
  RESUME=(--resume)
fi
# ${a[@]+"${a[@]}"}: an empty array expands to nothing (bash < 4.4 calls it unbound under set -u).
# CLI flags first, then key=value overrides (the user's last, so they win).
CMD=("$PY" "$REPO/tools/lazyconfig_train_net.py" --config-file "$CONFIG" ${RESUME[@]+"${RESUME[@]}"})
CMD+=(${FLAGS[@]+"${FLAGS[@]}"} ${OVERRIDES[@]+"${OVERRIDES[@]}"} "train.output_dir=$OUT" ${KV[@]+"${KV[@]}"})

if [ "$DRY_RUN" = 1 ]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
mkdir -p "$OUT"
if [ "$BACKGROUND" = 1 ]; then
  nohup "${CMD[@]}" >"$OUT/run.log" 2>&1 &
  echo $! >"$OUT/run.pid"
  echo "started $NAME in the background (pid $(cat "$OUT/run.pid")); follow it with: tail -f $OUT/run.log"
else
  cd "$REPO"
  "${CMD[@]}"
fi
