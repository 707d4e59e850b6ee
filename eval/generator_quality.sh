#!/usr/bin/env bash
# Issue 14, item 2: generator quality on both embedded datasets, lever by lever (csm inspect,
# judge = a CE classifier of its own, seed 100). Each model is fitted once (resumable), then
# inspected at each guidance (450 images = 90 groups x 5 λ, DDIM 25 steps, seed 0).
#   mnist5k-old:     preset small, 1,000 steps, epsilon prediction (eval/full_benchmark.sh's)
#   mnist5k-v-snr5:  preset small, 3,000 steps, v-prediction, min-SNR-5 loss weights
#   digits-small:    preset small, 1,500 steps, epsilon prediction (already meets the goals)
# usage: bash eval/generator_quality.sh [GUIDANCE ...]   (default: GUIDE below, the committed ones)
# Writes eval/results/generator-quality/<dataset>-<model>-g<G>/ (inspect.json + figures) and
# eval/results/generator-quality/README.md (python eval/generator_quality.py).
# WORK/diffusion-<dataset>-<model> may be a copy of the same fit made elsewhere (e.g. by
# eval/mixing_ablations.sh: .cache/mixing/digits/gen-new is digits-small), it is not refitted.
set -euo pipefail
WORK=${WORK:-.cache/generator-quality}
OUT=eval/results/generator-quality
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
declare -A ARGS=([mnist5k-old]="--steps 1000"
                 [mnist5k-v-snr5]="--steps 3000 --prediction-type v_prediction --snr-gamma 5"
                 [digits-small]="--steps 1500")
declare -A GUIDE=([mnist5k-old]="1 2 3" [mnist5k-v-snr5]="1 2" [digits-small]="1 2")
for m in mnist5k-old mnist5k-v-snr5 digits-small; do
  ds=${m%%-*}
  # shellcheck disable=SC2206
  if [ $# -gt 0 ]; then GUIDANCES=("$@"); else GUIDANCES=(${GUIDE[$m]}); fi
  # The mnist5k judge is trained on the split of its own seed (100), as it was for the committed
  # figures: its "real test" recognition is measured on split 0's test images, some of which it
  # trained on, so that one figure is an upper bound (the recognition of generated samples does
  # not involve them). The digits judge trains on split 0 (--data-seed 0), no such overlap.
  todo=(); for g in "${GUIDANCES[@]}"; do [ -f "$OUT/$m-g$g/inspect.json" ] || todo+=("$g"); done
  [ ${#todo[@]} -eq 0 ] && continue  # every inspection committed: nothing to fit
  judge=$WORK/judge-$ds-ce-seed100
  split=(); [ "$ds" = digits ] && split=(--data-seed 0)
  [ -f "$judge/model.safetensors" ] || csm train --config "train/$ds.yaml" --seed 100 \
    "${split[@]}" --out "$judge" --overwrite
  model=$WORK/diffusion-$m
  # shellcheck disable=SC2086
  [ -f "$model/model_index.json" ] || csm fit-diffusion --dataset "$ds" --preset small --seed 0 \
    --num-threads 1 ${ARGS[$m]} --out "$model" $( [ -d "$model" ] && echo --resume )
  for g in "${todo[@]}"; do
    dest=$OUT/$m-g$g
    csm inspect "$model" --judge "classifier:$judge" --out "$dest" --guidance "$g" --device cpu \
      --overwrite
    rm -rf "$dest/samples" "$dest/lambda_sweeps.png"  # large, regenerable: not committed
  done
done
python eval/generator_quality.py
