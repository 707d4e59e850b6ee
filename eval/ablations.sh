#!/usr/bin/env bash
# CSM ablations on digits, SEEDS seeds each, every setting fixed in advance (nothing is chosen on
# test; the reference point is CSM's defaults from ../shared/spec/csm-method.md: squash s = 4,
# l2 loss, endpoint + 1 interior image per real one, embedding mixing).
# Needs the output of `bash eval/full_benchmark.sh digits` (model, encoder, the synthetic dataset
# syn with its annotation s4). Label variants are named annotations over the same images
# (csm annotate --name NAME, label-only data, no dataset copy), trained with --synthetic DIR:NAME;
# DIR:lambda (the generation ratio as label) is built in.
#
# usage: bash eval/ablations.sh [PARALLEL [VARIANT ...]]
#   PARALLEL=2: two variants at a time; VARIANT names (see VARIANTS below) run only those.
# Writes eval/results/fast-recipes/digits-ablations/<variant>/ (one csm benchmark per variant) and
# its ablations.md (python eval/summarize.py). Superseded with the fast recipes by eval/regimes.sh.
set -euo pipefail
PARALLEL=${1:-1}
ONLY=("${@:2}")
WORK=${WORK:-.cache/full}
SEEDS=${SEEDS:-5}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
D=$WORK/digits
MODEL=$WORK/cache/diffusion-digits-small-1500steps
ENCODER=$D/encoder-ce-seed100
OUT=eval/results/fast-recipes/digits-ablations
SYN=$D/syn
SYN_EPS=$D/syn-eps
for need in "$MODEL/model_index.json" "$ENCODER/model.safetensors" "$SYN/csm_synthetic.json"; do
  [ -f "$need" ] || { echo "ablations.sh: $need missing; run bash eval/full_benchmark.sh digits first" >&2; exit 2; }
done

annotated() {  # annotated DIR S: the named annotation sS of DIR (squash S), skipped when done
  if ! python -c "import json,sys; sys.exit(0 if 's$2' in (json.load(open('$1/csm_synthetic.json')).get('annotations') or {}) else 1)"; then
    csm annotate "$1" --real digits --encoder "classifier:$ENCODER" --squash "$2" --name "s$2" \
      --activate false --device cpu
  fi
}
# eps mixing: same groups, seeds and steps, the two classes' noise predictions mixed instead
# (other images, so another generation)
if ! python -c "import json,sys; sys.exit(0 if json.load(open('$SYN_EPS/csm_synthetic.json')).get('finalized') else 1)" 2>/dev/null; then
  csm generate --model "$MODEL" --out "$SYN_EPS" --groups 512 --steps 25 --seed 0 \
    --mix-mode eps --device cpu $( [ -d "$SYN_EPS" ] && echo --resume )
fi
annotated "$SYN" 2
annotated "$SYN" 8
annotated "$SYN_EPS" 4

# variant name | synthetic dataset DIR:NAME | extra csm train options
VARIANTS=(
  "label-lambda|$SYN:lambda|"
  "squash-2|$SYN:s2|"
  "squash-8|$SYN:s8|"
  "loss-soft_ce|$SYN:s4|csm_loss=soft_ce"
  "loss-kl|$SYN:s4|csm_loss=kl"
  "per-real-1|$SYN:s4|syn_interior=0"
  "per-real-4|$SYN:s4|syn_interior=3"
  "mix-eps|$SYN_EPS:s4|"
)
run_variant() {
  IFS='|' read -r name syn opts <<< "$1"
  csm benchmark --dataset digits --methods csm --seeds "$SEEDS" --data-seed 0 --synthetic "$syn" \
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
