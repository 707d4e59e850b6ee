#!/usr/bin/env bash
# Full benchmark of one embedded dataset, from nothing to eval/results/<dataset>-5seeds/:
#   1. fit the class-conditional diffusion model (csm fit-diffusion, preset small)
#   2. generate the semantic-mixing groups (csm generate; one copy is kept with lambda as label)
#   3. train the annotation encoder: a CE classifier of its own (seed 100, not a benchmark run)
#   4. reannotate a copy with squash s = 4 (csm annotate --encoder classifier:...)
#   5. csm benchmark: every method x SEEDS seeds, every calibrator, clean + shifted test
#
# usage: bash eval/full_benchmark.sh digits|mnist5k [PARALLEL]
#   WORK (default .cache/full) holds models, synthetic data and the encoder;
#   PARALLEL=2 trains the runs in two processes (disjoint method lists; each skips finished
#   runs), then the final `csm benchmark` call below reuses every run and evaluates them all.
# Every step skips work that is already complete, so the script is resumable.
set -euo pipefail
DATASET=${1:?usage: bash eval/full_benchmark.sh digits|mnist5k [PARALLEL]}
PARALLEL=${2:-1}
WORK=${WORK:-.cache/full}
SEEDS=${SEEDS:-5}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case "$DATASET" in
  # digits: 1,293 train images -> 512 groups x 8 = 4,096 synthetic (3.2 per real, as CIFAR-10's
  # 159,840 / 50,000 in the paper); mnist5k: 3,600 train -> 384 x 8 = 3,072 (0.85 per real, what
  # fits the CPU budget at 28 px)
  digits) DIFF_STEPS=1500; NGROUPS=512 ;;
  mnist5k) DIFF_STEPS=1000; NGROUPS=384 ;;
  *) echo "full_benchmark.sh: unknown dataset $DATASET; use digits or mnist5k" >&2; exit 2 ;;
esac
MODEL=$WORK/cache/diffusion-$DATASET-small-${DIFF_STEPS}steps
SYN_LAMBDA=$WORK/$DATASET/syn-lambda
SYN=$WORK/$DATASET/syn-s4
ENCODER=$WORK/$DATASET/encoder-ce-seed100
OUT=eval/results/$DATASET-5seeds

finished() { [ -f "$1/csm_synthetic.json" ] && python -c "import json,sys; sys.exit(0 if json.load(open('$1/csm_synthetic.json')).get('finalized') else 1)"; }

[ -f "$MODEL/model_index.json" ] || csm fit-diffusion --dataset "$DATASET" --preset small \
  --steps "$DIFF_STEPS" --seed 0 --num-threads 1 --out "$MODEL" \
  $( [ -d "$MODEL" ] && echo --resume )
finished "$SYN_LAMBDA" || csm generate --model "$MODEL" --out "$SYN_LAMBDA" --groups "$NGROUPS" \
  --steps 25 --seed 0 --device cpu $( [ -d "$SYN_LAMBDA" ] && echo --resume )
[ -f "$ENCODER/model.safetensors" ] || csm train --config "train/$DATASET.yaml" --seed 100 \
  --out "$ENCODER" --overwrite
if [ ! -f "$SYN/annotation_report.json" ]; then
  rm -rf "$SYN" && cp -r "$SYN_LAMBDA" "$SYN"
  csm annotate "$SYN" --real "$DATASET" --encoder "classifier:$ENCODER" --squash 4 --device cpu
fi

BENCH=(--dataset "$DATASET" --seeds "$SEEDS" --synthetic "$SYN"
       --train-config "train/$DATASET.yaml" --out "$OUT")
if [ "$PARALLEL" -gt 1 ]; then
  # two trainers, disjoint halves of the method list (csm, the slowest, with the lighter half)
  A="ce ls brier focal flsd53 dual_focal bsce_gra mmce mbls"
  B="crl mixup regmixup rankmixup clue refcal csm"
  csm benchmark "${BENCH[@]}" --methods $A --calibrators ts --corruptions none --plots false &
  pa=$!
  csm benchmark "${BENCH[@]}" --methods $B --calibrators ts --corruptions none --plots false &
  pb=$!
  wait "$pa"; wait "$pb"  # set -e: either failing stops the script
fi
time csm benchmark "${BENCH[@]}" --methods all
