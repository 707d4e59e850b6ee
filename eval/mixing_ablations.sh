#!/usr/bin/env bash
# Issue 14, item 5: what each mixing lever does to CSM, SEEDS seeds, on one embedded dataset.
# One-at-a-time ablations from a base (improved generator, uniform λ grid, the paper's squash s4),
# every setting fixed in advance (nothing chosen on test):
#   base        improved generator, uniform λ, squash s = 4                  (DIR:s4)
#   judge-ts    the same images, --label-mode judge (T fitted on real val)    (DIR:judge-ts)
#   pair-fit    the same images, --label-mode pair-fit (s, t per pair, real val) (DIR:pair-fit)
#   targeted    improved generator, --lambda-schedule targeted from a pilot, s4
#   (and, spread only: the targeted schedule with --lambda-ends targeted)
#   old-gen     the old generator (preset small, epsilon, OLD_STEPS), uniform λ, s4
# plus CE on the same split. Each CSM variant is evaluated together with the CE runs, so its
# paired.csv holds the per-seed differences to CE with bootstrap intervals (csm evaluate).
#
# usage: bash eval/mixing_ablations.sh digits|mnist5k [VARIANT ...]
#   WORK (default .cache/mixing) holds generators, datasets and the encoder; OUT defaults to
#   eval/results/<dataset>-mixing-ablations. Every step skips finished work: rerun to resume.
#   Generator settings per dataset below (NEW_*: the improved one, OLD_*: the previous recipe).
# Summary: python eval/mixing_summary.py <dataset>
set -euo pipefail
DATASET=${1:?usage: bash eval/mixing_ablations.sh digits|mnist5k [VARIANT ...]}
ONLY=("${@:2}")
WORK=${WORK:-.cache/mixing}/$DATASET
OUT=${OUT:-eval/results/$DATASET-mixing-ablations}
SEEDS=${SEEDS:-5}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case "$DATASET" in
  # digits: the small generator already meets the quality goals (csm inspect), so there is no
  # old/new pair and the old-gen variant is skipped
  digits) NGROUPS=512; OLD_ARGS=(); NEW_ARGS=(--steps 1500); GUIDANCE=${GUIDANCE:-2} ;;
  mnist5k) NGROUPS=384; OLD_ARGS=(--steps 1000)
           NEW_ARGS=(--steps 3000 --prediction-type v_prediction --snr-gamma 5); GUIDANCE=${GUIDANCE:-2} ;;
  *) echo "mixing_ablations.sh: unknown dataset $DATASET; use digits or mnist5k" >&2; exit 2 ;;
esac
NEW=$WORK/gen-new; OLD=$WORK/gen-old; ENCODER=$WORK/encoder-ce-seed100
COMMON=(--dataset "$DATASET" --seeds "$SEEDS" --data-seed 0 --train-config "train/$DATASET.yaml"
        --calibrators ts --corruptions all)

finished() { [ -f "$1/csm_synthetic.json" ] && python -c "import json,sys; sys.exit(0 if json.load(open('$1/csm_synthetic.json')).get('finalized') else 1)"; }
has_annotation() { [ -f "$1/csm_synthetic.json" ] && python -c "import json,sys; sys.exit(0 if '$2' in (json.load(open('$1/csm_synthetic.json')).get('annotations') or {}) else 1)"; }
wanted() { [ ${#ONLY[@]} -eq 0 ] && return 0; local v; for v in "${ONLY[@]}"; do [ "$v" = "$1" ] && return 0; done; return 1; }
fit() {  # fit DIR ARGS...: the generator (split seed 0), resumable
  [ -f "$1/model_index.json" ] || csm fit-diffusion --dataset "$DATASET" --preset small --seed 0 \
    --num-threads 1 --out "$1" "${@:2}" $( [ -d "$1" ] && echo --resume )
}
generate() {  # generate MODEL DIR GROUPS ARGS...
  finished "$2" || csm generate --model "$1" --out "$2" --groups "$3" --steps 25 --guidance "$GUIDANCE" \
    --seed 0 --device cpu "${@:4}" $( [ -d "$2" ] && echo --resume )
}
annotate() {  # annotate DIR NAME ARGS...: a named annotation, not activated unless first
  has_annotation "$1" "$2" || csm annotate "$1" --real "$DATASET" --encoder "classifier:$ENCODER" \
    --name "$2" --device cpu "${@:3}"
}

fit "$NEW" "${NEW_ARGS[@]}"
[ ${#OLD_ARGS[@]} -gt 0 ] && fit "$OLD" "${OLD_ARGS[@]}"
[ -f "$ENCODER/model.safetensors" ] || csm train --config "train/$DATASET.yaml" --seed 100 \
  --data-seed 0 --out "$ENCODER" --overwrite
generate "$NEW" "$WORK/syn" "$NGROUPS"
annotate "$WORK/syn" s4 --squash 4
annotate "$WORK/syn" judge-ts --label-mode judge
annotate "$WORK/syn" pair-fit --label-mode pair-fit
generate "$NEW" "$WORK/pilot" 90  # every pair of 10 classes twice
annotate "$WORK/pilot" s4 --squash 4
generate "$NEW" "$WORK/syn-targeted" "$NGROUPS" --lambda-schedule targeted --pilot "$WORK/pilot:s4"
annotate "$WORK/syn-targeted" s4 --squash 4
if [ ${#OLD_ARGS[@]} -gt 0 ]; then
  generate "$OLD" "$WORK/syn-old" "$NGROUPS"
  annotate "$WORK/syn-old" s4 --squash 4
fi
# the same targeted schedule with every member placed, the ends too (--lambda-ends targeted):
# only its confidence spread is measured (its groups have no pure endpoint for the CSM sampler)
generate "$NEW" "$WORK/syn-targeted-ends" "$NGROUPS" --lambda-schedule targeted \
  --lambda-ends targeted --pilot "$WORK/pilot:s4"
annotate "$WORK/syn-targeted-ends" s4 --squash 4
# the confidence spread of the uniform and the targeted grids, the generator reports
for name in syn syn-targeted syn-targeted-ends; do
  [ -f "$OUT/inspect-$name/inspect.json" ] || csm inspect "$WORK/$name:s4" \
    --judge "classifier:$ENCODER" --out "$OUT/inspect-$name" --device cpu
  rm -rf "$OUT/inspect-$name/samples" "$OUT/inspect-$name/lambda_sweeps.png"  # regenerable
done

csm benchmark "${COMMON[@]}" --methods ce --out "$OUT/ce"
declare -A SPEC=([base]="$WORK/syn:s4" [judge-ts]="$WORK/syn:judge-ts" [pair-fit]="$WORK/syn:pair-fit"
                 [targeted]="$WORK/syn-targeted:s4" [old-gen]="$WORK/syn-old:s4")
for v in base judge-ts pair-fit targeted old-gen; do
  wanted "$v" || continue
  [ "$v" = old-gen ] && [ ${#OLD_ARGS[@]} -eq 0 ] && continue
  csm benchmark "${COMMON[@]}" --methods csm --synthetic "${SPEC[$v]}" --out "$OUT/csm-$v"
  # CE and this variant together: paired.csv = per-seed differences to CE with intervals
  csm evaluate "$OUT"/ce/runs/ce/seed* "$OUT/csm-$v"/runs/csm/seed* --out "$OUT/eval-$v" \
    --calibrators ts --corruptions all --overwrite
done
python eval/mixing_summary.py "$DATASET"
