#!/usr/bin/env bash
# CSM ablations on digits, SEEDS seeds each, every setting fixed in advance (nothing is chosen on
# test; the reference point is CSM's defaults from ../shared/spec/csm-method.md: squash s = 4,
# l2 loss, endpoint + 1 interior image per real one, embedding mixing).
# Needs the output of `bash eval/full_benchmark.sh digits` (model, syn-lambda, encoder, syn-s4).
#
# usage: bash eval/ablations.sh [PARALLEL [VARIANT ...]]
#   PARALLEL=2: two variants at a time; VARIANT names (see VARIANTS below) run only those.
# Writes eval/results/digits-ablations/<variant>/ (one csm benchmark per variant) and
# eval/results/digits-ablations/ablations.md (python eval/summarize.py).
set -euo pipefail
PARALLEL=${1:-1}
ONLY=("${@:2}")
WORK=${WORK:-.cache/full}
SEEDS=${SEEDS:-5}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
D=$WORK/digits
MODEL=$WORK/cache/diffusion-digits-small-1500steps
ENCODER=$D/encoder-ce-seed100
OUT=eval/results/digits-ablations
for need in "$MODEL/model_index.json" "$ENCODER/model.safetensors" "$D/syn-lambda/csm_synthetic.json"; do
  [ -f "$need" ] || { echo "ablations.sh: $need missing; run bash eval/full_benchmark.sh digits first" >&2; exit 2; }
done

annotated() {  # annotated SRC DST S: a copy of SRC reannotated with squash S (skipped when done)
  if [ ! -f "$2/annotation_report.json" ]; then
    rm -rf "$2" && cp -r "$1" "$2"
    csm annotate "$2" --real digits --encoder "classifier:$ENCODER" --squash "$3" --device cpu
  fi
}
# eps mixing: same groups, seeds and steps, the two classes' noise predictions mixed instead
if ! python -c "import json,sys; sys.exit(0 if json.load(open('$D/syn-eps-lambda/csm_synthetic.json')).get('finalized') else 1)" 2>/dev/null; then
  csm generate --model "$MODEL" --out "$D/syn-eps-lambda" --groups 512 --steps 25 --seed 0 \
    --mix-mode eps --device cpu $( [ -d "$D/syn-eps-lambda" ] && echo --resume )
fi
annotated "$D/syn-lambda" "$D/syn-s2" 2
annotated "$D/syn-lambda" "$D/syn-s8" 8
annotated "$D/syn-eps-lambda" "$D/syn-eps-s4" 4

# variant name | synthetic dataset | extra csm train options
VARIANTS=(
  "label-lambda|$D/syn-lambda|"
  "squash-2|$D/syn-s2|"
  "squash-8|$D/syn-s8|"
  "loss-soft_ce|$D/syn-s4|csm_loss=soft_ce"
  "loss-kl|$D/syn-s4|csm_loss=kl"
  "per-real-1|$D/syn-s4|syn_interior=0"
  "per-real-4|$D/syn-s4|syn_interior=3"
  "mix-eps|$D/syn-eps-s4|"
)
run_variant() {
  IFS='|' read -r name syn opts <<< "$1"
  csm benchmark --dataset digits --methods csm --seeds "$SEEDS" --synthetic "$syn" \
    --train-config train/digits.yaml ${opts:+--train-options $opts} \
    --calibrators ts --corruptions none --plots false --out "$OUT/$name"
}
pids=()
for v in "${VARIANTS[@]}"; do
  if [ "${#ONLY[@]}" -gt 0 ] && [[ ! " ${ONLY[*]} " == *" ${v%%|*} "* ]]; then continue; fi
  run_variant "$v" &
  pids+=($!)
  if [ "${#pids[@]}" -ge "$PARALLEL" ]; then
    for p in "${pids[@]}"; do wait "$p"; done  # set -e: a failed variant stops the script
    pids=()
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
python eval/summarize.py
