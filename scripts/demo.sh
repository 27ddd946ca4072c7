#!/usr/bin/env bash
# `make demo`: the whole repa pipeline, offline, on 2 CPU cores, in a few minutes (docs/demo.md).
#
#   1. teacher     python -m repa.preprocess.demo_teacher   a small timm ViT trained ~1 min on half of
#                                                      scikit-learn's digits (cached in $REPA_CACHE or
#                                                      ~/.cache/repa, reused)
#      autoencoder python -m repa.preprocess.demo_teacher --vae   a tiny diffusers AutoencoderKL (8x down,
#                                                      4 channels, like the SD-VAE), trained ~1 min, cached
#   2. preprocess  repa-preprocess digits --res 64 --vae <autoencoder> --enc-type timm:local-dir:<teacher>
#                  8x8x4 latents; the teacher sees 8 px (patch 2) -> a 4x4 token grid
#   3. train       repa-train: SiT-/2 on the 8x8 latent -> the SAME 4x4 token grid (as SiT-/2 on the 256 px
#                  SD-VAE latent and DINOv2's 16x16 grid), REPA on (proj-coeff 0.5 at block 2)
#   4. sample      repa-sample: 100 class-balanced samples -> PNGs, .npz, grid PNG
#   5. judge       repa.sampler.digits_judge: an independent convnet (trained on the other half of the digits,
#                  never on the teacher's) reads the samples' classes
#   6. probe       python -m repa.sampler.align (= repa-eval align): CKNNA of every block with the teacher
#   7. figures     scripts/plot_losses.py: loss curves PNG, samples grid with one row per class
#
# Everything lands in demo_out/ (override with DEMO_OUT). DEMO_STEPS sets the training steps.
# Rerunning reuses the teacher, the shards and a finished training run.
set -euo pipefail
cd "$(dirname "$0")/.."

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
PY="${PYTHON:-python}"
OUT="${DEMO_OUT:-demo_out}"
STEPS="${DEMO_STEPS:-1000}"
RES=64
mkdir -p "$OUT"
T0=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - T0 ))s] $*" >&2; }

stamp "1/7 teacher: a pretrained ViT built from half of the embedded digits; an autoencoder (reused if cached)"
TEACHER=$("$PY" -m repa.preprocess.demo_teacher --resolution "$RES" | tail -1)
VAE=$("$PY" -m repa.preprocess.demo_teacher --vae --resolution "$RES" | tail -1)

stamp "2/7 repa-preprocess digits -> $OUT/shards (8x8x4 latents, teacher features on a 4x4 grid)"
repa-preprocess digits --res "$RES" --vae "$VAE" --enc-type "timm:local-dir:$TEACHER" \
    --out "$OUT/shards" --num-workers 1 --no-progress

stamp "3/7 repa-train: SiT (4 blocks, width 128, patch 2 -> 4x4 tokens) + REPA, $STEPS steps"
# The same student as bench/repa_effect.py (MODEL, MODEL_KWARGS there).
T_TRAIN=$(date +%s)
repa-train --shards "$OUT/shards" --output-dir "$OUT/exps" --exp-name digits-repa \
    --model SiT-S/2 --model-kwargs '{"hidden_size": 128, "depth": 4, "num_heads": 4, "projector_dim": 256}' \
    --encoder-depth 2 --proj-coeff 0.5 --batch-size 64 --learning-rate 2e-3 --ema-decay 0.995 \
    --max-train-steps "$STEPS" --checkpointing-steps "$STEPS" --mixed-precision no --num-workers 1 \
    --sampling-steps 0 --seed 0 --resume auto
TRAIN_S=$(( $(date +%s) - T_TRAIN ))
CKPT="$OUT/exps/digits-repa/checkpoints/$(printf '%07d' "$STEPS")"
test -d "$CKPT" || { echo "demo: training did not write $CKPT" >&2; exit 1; }

stamp "4/7 repa-sample: 100 class-balanced samples (Euler ODE, 25 steps, CFG 2.0)"
NPZ=$(repa-sample --ckpt "$CKPT" --num-fid-samples 100 --label-sampling balanced --num-steps 25 \
    --cfg-scale 2.0 --per-proc-batch-size 100 --sample-dir "$OUT/samples" --no-progress | tail -1)

stamp "5/7 judge: an independent classifier reads the samples' classes"
JUDGE=$("$PY" -m repa.sampler.digits_judge --npz "$NPZ" | tail -1)
echo "$JUDGE" > "$OUT/judge.json"

stamp "6/7 alignment probe (repa-eval align): CKNNA of each block with the teacher"
repa-eval align "$CKPT" --shards "$OUT/shards" --t 0.25,0.5,0.75 --num-samples 600 \
    --out "$OUT/align.json" >/dev/null

stamp "7/7 figures"
"$PY" scripts/plot_losses.py --metrics "$OUT/exps/digits-repa/metrics.jsonl" --npz "$NPZ" --out-dir "$OUT" >/dev/null

ACC=$("$PY" -c 'import json, sys; print("%.2f" % json.loads(sys.argv[1])["acc"])' "$JUDGE")
stamp "done"
cat <<EOF

repa demo finished in $(( $(date +%s) - T0 )) s (training $TRAIN_S s). Independent judge: $ACC of the
samples are read as the class they were asked for (chance 0.10). Outputs:
  teacher (timm folder)   $TEACHER
  autoencoder (diffusers) $VAE
  shards                  $OUT/shards
  checkpoint              $CKPT
  training metrics        $OUT/exps/digits-repa/metrics.jsonl
  samples (.npz, ADM)     $NPZ
  sample PNGs             ${NPZ%.npz}/
  judge result            $OUT/judge.json
Pictures:
  samples by class        $OUT/samples_by_class.png   (row k = class k)
  sampler grid            ${NPZ%.npz}-grid.png
  loss curves             $OUT/loss_curves.png
  alignment by block      $OUT/align.png   (CKNNA with the teacher, linear probe; $OUT/align.json)
EOF
