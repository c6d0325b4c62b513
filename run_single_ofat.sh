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
  # Smoke schedule on small images with a CPU-sized pyramid and RoI stage: 64 channels in the
  # feature pyramid, RPN and box heads, fewer RoIs per image (the 4-conv, 256-wide heads over 512
  # RoIs per image take ~40 s a step on 2 cores; 64 pyramid channels halve a 128 px step again).
  # No pretrained ViM weights can be assumed here: the backbone starts from random
  # weights (kept frozen) unless ckpts/vim_tiny_pretrained.pth exists; the fixed seed makes that
  # random backbone the same in every quick run, so they share the frozen-feature cache.
  OVERRIDES+=(dataloader.image_size=${RAT_QUICK_IMAGE_SIZE:-128} train.epochs=${RAT_QUICK_EPOCHS:-24}
              train.warmup_iters=20 dataloader.train.num_workers=0 dataloader.test.num_workers=0
              dataloader.final_test.num_workers=0 train.log_period=5 train.seed=0
              model.roi_heads.batch_size_per_image=32 "model.proposal_generator.post_nms_topk=[200,50]")
  OVERRIDES+=(model.backbone.out_channels=64 model.proposal_generator.head.in_channels=64)
  for stage in 0 1 2; do
    OVERRIDES+=("model.roi_heads.box_heads.$stage.conv_dims=[64,64,64,64]"
                "model.roi_heads.box_heads.$stage.input_shape.channels=64")
  done
  if [ ! -f "$REPO/ckpts/vim_tiny_pretrained.pth" ]; then
    echo "WARNING: quick mode without ckpts/vim_tiny_pretrained.pth: the ViM backbone is randomly" \
         "initialised (frozen); figures show the machinery works, not the model's real accuracy." >&2
    OVERRIDES+=("model.backbone.net.checkpoint=")
  fi
fi
mkdir -p "$OUT"
RESUME=()
if [ -f "$OUT/last_checkpoint" ]; then
  echo "resuming from $(cat "$OUT/last_checkpoint") in $OUT"
  RESUME=(--resume)
fi
CMD=("$PY" "$REPO/tools/lazyconfig_train_net.py" --config-file "$CONFIG" "${RESUME[@]}"
)
# CLI flags first, then key=value overrides (the user's last, so they win).
FLAGS=(); KV=()
for a in "${EXTRA[@]}"; do case "$a" in *=*) KV+=("$a") ;; *) FLAGS+=("$a") ;; esac; done
CMD+=("${FLAGS[@]}" "${OVERRIDES[@]}" "train.output_dir=$OUT" "${KV[@]}")

if [ "$BACKGROUND" = 1 ]; then
  nohup "${CMD[@]}" >"$OUT/run.log" 2>&1 &
  echo $! >"$OUT/run.pid"
  echo "started $NAME in the background (pid $(cat "$OUT/run.pid")); follow it with: tail -f $OUT/run.log"
else
  cd "$REPO"
  "${CMD[@]}"
fi
