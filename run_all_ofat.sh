#!/usr/bin/env bash
# Run the nine OFAT experiments in sequence (baseline first).
#
#   ./run_all_ofat.sh [--quick] [run_single_ofat.sh options ...]
#   ./run_all_ofat.sh --clean [--yes]
#
# Finished runs (final_metrics.json present) are skipped; a failed run does not stop the others;
# the end prints which finished and which failed, with their logs. --clean stops the runs this
# script started (by their PID files, nothing else) and removes work_dirs/ofat_* and the
# filtered annotation files, after confirmation (--yes skips the question). RAT_WORK_DIRS moves
# work_dirs/ elsewhere.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="${RAT_WORK_DIRS:-$REPO/work_dirs}"
DATA="${RAT_DATASETS:-${DETECTRON2_DATASETS:-$REPO/datasets}}/coco"
NAMES=(baseline_lr0.001_bs8_adamw_ep100 ofat_lr0.01_bs8_adamw_ep100 ofat_lr0.005_bs8_adamw_ep100
       ofat_lr0.001_bs16_adamw_ep100 ofat_lr0.001_bs32_adamw_ep100 ofat_lr0.001_bs8_sgd_ep100
       ofat_lr0.001_bs8_rmsprop_ep100 ofat_lr0.001_bs8_adamw_ep150 ofat_lr0.001_bs8_adamw_ep200)

stop_started_runs() {
  local pidfile pid
  for pidfile in "$WORK"/ofat_*/run.pid "$WORK"/.run_all_ofat.pid; do
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    # only a live process that is one of ours (guards against a recycled PID)
    if kill -0 "$pid" 2>/dev/null &&
        grep -qaE "run_single_ofat|lazyconfig_train_net|run_all_ofat" "/proc/$pid/cmdline" 2>/dev/null; then
      [ "$pid" = "$$" ] && continue
      echo "stopping pid $pid ($pidfile)"
      pkill -TERM -P "$pid" 2>/dev/null  # its children (the training process)
      kill -TERM "$pid" 2>/dev/null
    fi
  done
}

if [ "${1:-}" = "--clean" ]; then
  targets=$(ls -d "$WORK"/ofat_* "$DATA"/*/_annotations.coco_filtered.json 2>/dev/null)
  if [ -z "$targets" ]; then echo "nothing to clean"; exit 0; fi
  echo "This removes:"; echo "$targets" | sed 's/^/  /'
  if [ "${2:-}" != "--yes" ]; then
    read -r -p "Proceed? [y/N] " answer </dev/tty 2>/dev/null || answer=""
    case "$answer" in y|Y|yes) ;; *) echo "nothing removed"; exit 1 ;; esac
  fi
  stop_started_runs
  sleep 1
  echo "$targets" | while read -r t; do rm -rf -- "$t"; done
  rm -f "$WORK/.run_all_ofat.pid"
  echo "cleaned"
  exit 0
fi

SUFFIX=""
for a in "$@"; do [ "$a" = "--quick" ] && SUFFIX="_quick"; done
mkdir -p "$WORK"
echo $$ >"$WORK/.run_all_ofat.pid"
trap 'stop_started_runs; rm -f "$WORK/.run_all_ofat.pid"; exit 130' INT TERM
finished=(); failed=(); skipped=()
for name in "${NAMES[@]}"; do
  out="$WORK/ofat_${name}${SUFFIX}"
  if [ -f "$out/final_metrics.json" ]; then
    echo "== $name: already finished, skipping"; skipped+=("$name"); continue
  fi
  mkdir -p "$out"
  echo "== $name: starting (log: $out/run.log)"
  "$REPO/run_single_ofat.sh" "$name" "$@" >"$out/run.log" 2>&1 &
  echo $! >"$out/run.pid"
  if wait $!; then finished+=("$name"); else failed+=("$name"); echo "== $name: FAILED (see $out/run.log)"; fi
  rm -f "$out/run.pid"
done
rm -f "$WORK/.run_all_ofat.pid"
echo
echo "OFAT summary: ${#finished[@]} finished now, ${#skipped[@]} finished before, ${#failed[@]} failed"
# ${a[@]+"${a[@]}"}: an empty array expands to nothing (bash < 4.4 calls it unbound under set -u)
for n in ${finished[@]+"${finished[@]}"}; do echo "  finished: $n"; done
for n in ${skipped[@]+"${skipped[@]}"}; do echo "  finished before: $n"; done
for n in ${failed[@]+"${failed[@]}"}; do echo "  FAILED:   $n  (log: $WORK/ofat_${n}${SUFFIX}/run.log)"; done
[ ${#failed[@]} -eq 0 ]
