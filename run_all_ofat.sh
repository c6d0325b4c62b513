#!/usr/bin/env bash
# Run the nine OFAT experiments in sequence (baseline first).
#
#   ./run_all_ofat.sh [--quick] [--with-best] [run_single_ofat.sh options ...] [key=value ...]
#   ./run_all_ofat.sh --clean [--yes]
#   ./run_all_ofat.sh [--quick] [key=value ...] --submit [tools/submit.py options ...]
#
# Finished runs (final_metrics.json present) are skipped; a failed run does not stop the others;
# the end prints which finished and which failed, with their logs, and writes the summary table
# and plots (tools/summarize_ofat.py). --with-best then writes the combined-best config (each
# factor at its best level by validation mAP@0.5; a LazyConfig that inherits the baseline, in
# work_dirs/ofat_best_combination/) and runs it as the tenth experiment. The options are checked once,
# before the first run starts (a typo fails at once, not nine times). --clean stops the runs this
# script started (by their PID files, nothing else) and removes work_dirs/ofat_* and the
# filtered annotation files, after confirmation (--yes skips the question). RAT_WORK_DIRS moves
# work_dirs/ elsewhere. --submit queues the nine as one SLURM / LSF job array instead (the options
# after it are tools/submit.py's, e.g. --gpus-per-node 1 --time 12:00:00, plus --max-parallel N),
# with the summary table as a job that runs when the array ends; status:
# python -m rat_plugins.cluster.sweep status work_dirs/ofat_sweep.json
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROG="./run_all_ofat.sh"
usage() { sed -n '2,/^set /{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
usage_error() {
  echo "error: $1" >&2
  echo "usage: $PROG [--quick] [run_single_ofat.sh options] [key=value ...]  |  $PROG --clean [--yes]" \
    "(--help for more)" >&2
  exit 2
}
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

# -- the command line: --clean [--yes] alone, or options for run_single_ofat.sh ------------------
CLEAN=0; YES=0; QUICK_SUFFIX=""; PASS=(); SUBMIT=0; SUBMIT_ARGS=(); WITH_BEST=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --submit) SUBMIT=1; shift; SUBMIT_ARGS=("$@"); break ;;
    --clean) CLEAN=1 ;;
    --yes) YES=1 ;;
    --with-best) WITH_BEST=1 ;;
    --quick) QUICK_SUFFIX="_quick"; PASS+=("$1") ;;
    --background | --dry-run) usage_error "$1 is an option of run_single_ofat.sh only (this script runs the nine in turn)" ;;
    --num-gpus | --micro-batch | --num-machines | --machine-rank | --dist-url)
      # its value travels with it (a missing one is reported by the check below)
      PASS+=("$1")
      if [ $# -ge 2 ] && [ "${2#--}" = "$2" ]; then PASS+=("$2"); shift; fi
      ;;
    -* | *=*) PASS+=("$1") ;;
    *) usage_error "unexpected argument '$1': this script runs all nine experiments; for one, use run_single_ofat.sh $1" ;;
  esac
  shift
done
if [ "$SUBMIT" = 1 ] && [ "$WITH_BEST" = 1 ]; then
  usage_error "--with-best does not go with --submit: once the array has finished, run $PROG --with-best here (the nine are skipped as finished)"
fi
[ "$CLEAN" = 0 ] || [ "$WITH_BEST" = 0 ] || usage_error "--with-best does not go with --clean"
PY="${PYTHON:-$REPO/.venv/bin/python}"; [ -x "$PY" ] || PY=python
if [ "$SUBMIT" = 1 ]; then
  # the sweep's manifest (runs, overrides, summary), then one array job through the scheduler
  MANIFEST_ARGS=()
  for a in ${PASS[@]+"${PASS[@]}"}; do
    case "$a" in
      --quick | *=*) MANIFEST_ARGS+=("$a") ;;
      *) usage_error "$a does not go with --submit (the job's resources are tools/submit.py options after --submit)" ;;
    esac
  done
  [ "$CLEAN" = 0 ] || usage_error "--clean does not go with --submit"
  MANIFEST="$WORK/ofat_sweep${QUICK_SUFFIX}.json"
  cd "$REPO" || exit 1
  "$PY" -m rat_plugins.experiments.ofat sweep-manifest "$MANIFEST" --work-dirs "$WORK" \
    ${MANIFEST_ARGS[@]+"${MANIFEST_ARGS[@]}"} >/dev/null || exit $?
  exec "$PY" -m rat_plugins.cluster.sweep submit "$MANIFEST" ${SUBMIT_ARGS[@]+"${SUBMIT_ARGS[@]}"}
fi
if [ "$CLEAN" = 1 ] && [ ${#PASS[@]} -gt 0 ]; then
  usage_error "--clean takes no other option than --yes (got: ${PASS[*]})"
fi
[ "$YES" = 0 ] || [ "$CLEAN" = 1 ] || usage_error "--yes only goes with --clean"
if [ "$CLEAN" = 0 ]; then
  # run_single_ofat.sh checks the options (its --dry-run writes nothing); its exit status 2 is a
  # usage error, whose message is ours. Other failures are left to the runs themselves to report.
  check="$("$REPO/run_single_ofat.sh" "${NAMES[0]}" --dry-run ${PASS[@]+"${PASS[@]}"} 2>&1 >/dev/null)"
  if [ $? -eq 2 ]; then
    usage_error "$(printf '%s\n' "$check" | grep -m1 '^error: ' | sed 's/^error: //')"
  fi
fi

if [ "$CLEAN" = 1 ]; then
  targets=$(ls -d "$WORK"/ofat_* "$DATA"/*/_annotations.coco_filtered.json 2>/dev/null)
  if [ -z "$targets" ]; then echo "nothing to clean"; exit 0; fi
  echo "This removes:"; echo "$targets" | sed 's/^/  /'
  if [ "$YES" = 0 ]; then
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

SUFFIX="$QUICK_SUFFIX"
mkdir -p "$WORK"
echo $$ >"$WORK/.run_all_ofat.pid"
trap 'stop_started_runs; rm -f "$WORK/.run_all_ofat.pid"; exit 130' INT TERM
finished=(); failed=(); skipped=()
# run_one NAME [CONFIG]: one experiment (CONFIG: a config file's path, else NAME's OFAT config), its pid
# file while it runs, its outcome in the lists above
run_one() {
  local name="$1" what="${2:-$1}" out="$WORK/ofat_$1${SUFFIX}"
  mkdir -p "$out"
  echo "== $name: starting ${2:+$2 }(log: $out/run.log)"
  "$REPO/run_single_ofat.sh" "$what" ${PASS[@]+"${PASS[@]}"} >"$out/run.log" 2>&1 &
  echo $! >"$out/run.pid"
  if wait $!; then finished+=("$name"); else failed+=("$name"); echo "== $name: FAILED (see $out/run.log)"; fi
  rm -f "$out/run.pid"
}
finished_before() {
  [ -f "$WORK/ofat_$1${SUFFIX}/final_metrics.json" ] || return 1
  echo "== $1: already finished, skipping"; skipped+=("$1")
}
for name in "${NAMES[@]}"; do
  finished_before "$name" || run_one "$name"
done
if [ "$WITH_BEST" = 1 ] && ! finished_before best_combination; then
  if config="$(cd "$REPO" && RAT_WORK_DIRS="$WORK" "$PY" -m rat_plugins.experiments.ofat best-combination \
      --work-dirs "$WORK" ${QUICK_SUFFIX:+--quick})"; then
    run_one best_combination "$config"
  else
    failed+=(best_combination); echo "== best_combination: no combined-best config (above)"
  fi
fi
rm -f "$WORK/.run_all_ofat.pid"
echo
(cd "$REPO" && "$PY" tools/summarize_ofat.py --work-dirs "$WORK") || echo "== the summary table failed (above)"
echo
echo "OFAT summary: ${#finished[@]} finished now, ${#skipped[@]} finished before, ${#failed[@]} failed"
# ${a[@]+"${a[@]}"}: an empty array expands to nothing (bash < 4.4 calls it unbound under set -u)
for n in ${finished[@]+"${finished[@]}"}; do echo "  finished: $n"; done
for n in ${skipped[@]+"${skipped[@]}"}; do echo "  finished before: $n"; done
for n in ${failed[@]+"${failed[@]}"}; do echo "  FAILED:   $n  (log: $WORK/ofat_${n}${SUFFIX}/run.log)"; done
[ ${#failed[@]} -eq 0 ]
