#!/usr/bin/env bash
# `make demo`: the whole repa pipeline, offline, on 2 CPU cores, in a few minutes.
#
#   1. teacher     python -m repa.preprocess.demo_teacher   a small timm ViT trained ~1 min on scikit-learn's digits
#                                                      (cached in $REPA_CACHE or ~/.cache/repa, reused)
#   2. preprocess  repa-preprocess digits --vae none --enc-type timm:local-dir:<teacher>   (32 px, pixel space)
#   3. train       repa-train: a 4-block SiT with REPA (proj-coeff 0.5)
#   4. sample      repa-sample: 100 class-balanced samples -> PNGs, .npz, grid PNG
#   5. figures     scripts/plot_losses.py: loss curves PNG, samples grid with one row per class
#
# Everything lands in demo_out/ (override with DEMO_OUT). DEMO_STEPS sets the training steps.
# Rerunning reuses the teacher, the shards and a finished training run.
set -euo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
PY="${PYTHON:-python}"
OUT="${DEMO_OUT:-demo_out}"
STEPS="${DEMO_STEPS:-1500}"
RES=32
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - T0 ))s] $*" >&2; }

stamp "1/5 teacher: a pretrained ViT built from the embedded digits (reused if cached)"
TEACHER=$("$PY" -m repa.preprocess.demo_teacher --resolution "$RES" | tail -1)

stamp "2/5 repa-preprocess digits -> $OUT/shards (pixel space, teacher features)"
repa-preprocess digits --res "$RES" --vae none --enc-type "timm:local-dir:$TEACHER" \
    --out "$OUT/shards" --num-workers 1 --no-progress

stamp "3/5 repa-train: SiT (4 blocks, width 64, 8x8 tokens) + REPA, $STEPS steps"
# The same student and flags as bench/repa_effect.py (MODEL, MODEL_KWARGS, TRAIN_FLAGS there).
repa-train --shards "$OUT/shards" --output-dir "$OUT/exps" --exp-name digits-repa \
    --model SiT-S/4 --model-kwargs '{"hidden_size": 64, "depth": 4, "num_heads": 4, "projector_dim": 256}' \
    --encoder-depth 2 --proj-coeff 0.5 --batch-size 32 --learning-rate 1e-3 --ema-decay 0.995 \
    --max-train-steps "$STEPS" --checkpointing-steps "$STEPS" --mixed-precision no --num-workers 1 \
    --sampling-steps 0 --seed 0 --resume auto
CKPT="$OUT/exps/digits-repa/checkpoints/$(printf '%07d' "$STEPS")"
test -d "$CKPT" || { echo "demo: training did not write $CKPT" >&2; exit 1; }

stamp "4/5 repa-sample: 100 class-balanced samples (Euler ODE, 25 steps, CFG 2.0)"
NPZ=$(repa-sample --ckpt "$CKPT" --num-fid-samples 100 --label-sampling balanced --num-steps 25 \
    --cfg-scale 2.0 --per-proc-batch-size 100 --sample-dir "$OUT/samples" --no-progress | tail -1)

stamp "5/5 figures"
"$PY" scripts/plot_losses.py --metrics "$OUT/exps/digits-repa/metrics.jsonl" --npz "$NPZ" --out-dir "$OUT" >/dev/null

stamp "done"
cat <<EOF

repa demo finished in $(( $(date +%s) - T0 )) s. Outputs:
  teacher (timm folder)   $TEACHER
  shards                  $OUT/shards
  checkpoint              $CKPT
  training metrics        $OUT/exps/digits-repa/metrics.jsonl
  samples (.npz, ADM)     $NPZ
  sample PNGs             ${NPZ%.npz}/
  sampler grid            ${NPZ%.npz}-grid.png
  samples by class        $OUT/samples_by_class.png   (row k = class k)
  loss curves             $OUT/loss_curves.png
EOF
