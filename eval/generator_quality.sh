#!/usr/bin/env bash
# Issue 14, item 2: generator quality on mnist5k, lever by lever (csm inspect, judge = a CE
# classifier of its own, seed 100). Each model is fitted once (resumable), then inspected at
# guidance 1, 2 and 3 (450 images = 90 groups x 5 λ, DDIM 25 steps, seed 0).
#   old:     preset small, 1,000 steps, epsilon prediction (the recipe of eval/full_benchmark.sh)
#   v-snr5:  preset small, 3,000 steps, v-prediction, min-SNR-5 loss weights
# usage: bash eval/generator_quality.sh [GUIDANCE ...]   (default: 1 2 3)
# Writes eval/results/generator-quality/mnist5k-<model>-g<G>/ (inspect.json + figures) and
# eval/results/generator-quality/README.md (python eval/generator_quality.py).
set -euo pipefail
WORK=${WORK:-.cache/generator-quality}
OUT=eval/results/generator-quality
if [ $# -gt 0 ]; then GUIDANCES=("$@"); else GUIDANCES=(1 2 3); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The judge is trained on the split of its own seed (100), as it was for the committed figures:
# its "real test" recognition is measured on split 0's test images, some of which it trained on,
# so that one figure is an upper bound; the recognition of generated samples does not involve them.
JUDGE=$WORK/judge-ce-seed100
[ -f "$JUDGE/model.safetensors" ] || csm train --config train/mnist5k.yaml --seed 100 --out "$JUDGE" --overwrite
declare -A ARGS=([old]="--steps 1000" [v-snr5]="--steps 3000 --prediction-type v_prediction --snr-gamma 5")
for m in old v-snr5; do
  model=$WORK/diffusion-mnist5k-$m
  # shellcheck disable=SC2086
  [ -f "$model/model_index.json" ] || csm fit-diffusion --dataset mnist5k --preset small --seed 0 \
    --num-threads 1 ${ARGS[$m]} --out "$model" $( [ -d "$model" ] && echo --resume )
  for g in "${GUIDANCES[@]}"; do
    dest=$OUT/mnist5k-$m-g$g
    [ -f "$dest/inspect.json" ] || csm inspect "$model" --judge "classifier:$JUDGE" --out "$dest" \
      --guidance "$g" --device cpu --overwrite
    rm -rf "$dest/samples" "$dest/lambda_sweeps.png"  # large, regenerable: not committed
  done
done
python eval/generator_quality.py
