#!/usr/bin/env bash
# Issue 15: the full re-run of one embedded dataset in one regime, from nothing to
# eval/results/<dataset>-<regime>/ (results.csv, leaderboard with the paired comparison against
# CE and the sanity section, reliability and risk-coverage figures).
#
#   regime converged      train/<dataset>_converged.yaml: the small CNN trained to convergence
#   regime overconfident  train/<dataset>_overconfident.yaml: a CIFAR ResNet-18 (full width on
#                         digits, width 32 on mnist5k) on a 15-per-class subset, no weight decay
#                         or augmentation, trained to zero loss: CE's OE clearly exceeds its UE
#                         and TS at least halves its ECE (digits: in the debiased estimator only)
#
# Protocol (fixed before any run, nothing chosen on test):
#   * every seed s draws its own split (data seed s) and every model behind the synthetic data of
#     split s is trained on exactly the runs' training images of split s: the generator
#     (csm fit-diffusion --split-seed s --val-fraction/--train-per-class of the recipe) and the
#     annotation encoder (csm train --config <recipe> --seed 100 --data-seed s); csm train refuses
#     synthetic data whose recorded split differs (csm.training.sampler.check_synthetic_split);
#   * the calibrators are fitted on val (30% of the non-test images), its size and error count
#     per run are in the leaderboard's sanity section (runs under 20 errors are flagged);
#   * CSM's label mode is chosen on validation only, per regime: STAGE=choose trains CSM with
#     each label mode of CSM_CHOICES (train only, csm benchmark --evaluate false; the regime's own
#     CSM runs answer for their label) and eval/csm_choice.py keeps the lowest mean val ECE (the
#     rule of the mixing ablations, eval/results/*-mixing-ablations/summary.md); CSM_LABEL=auto
#     then uses it (its table: OUT/csm_choice.md) and copies the chosen mode's runs into OUT
#     instead of training them again. CSM_LABEL=s4|judge-ts|pair-fit fixes it.
#
# usage: bash eval/regimes.sh digits|mnist5k converged|overconfident [PARALLEL]
#   WORK (default .cache/regimes) holds generators, synthetic data and encoders; SEEDS (5);
#   METHODS (default: the methods the CSM paper compares against, plus CE and CSM; "all": all 16);
#   PARALLEL=2 trains in two worker processes sharing a queue of methods; STAGE=fit fits only the
#   generators and encoders (they do not depend on CSM's label choice); STAGE=build also makes
#   the synthetic data and its label of every mode of CSM_CHOICES; SPLITS="3 4" limits either to
#   those splits (two runs on disjoint splits share the work); STAGE=choose chooses
#   CSM's label mode on validation (above; CSM_CHOICES, default "s4 judge-ts pair-fit"), after
#   which CSM_LABEL=auto runs the benchmark with it, moving CSM runs of another label mode out of
#   OUT to WORK/choice/superseded/ (their run.json are kept there). A smoke run at toy size:
#   OUT=/tmp/r/digits-overconfident SEEDS=1 METHODS="ce csm" GEN_STEPS=20 NGROUPS=45 EPOCHS=1
#   SAMPLE_STEPS=2 (tests/workflows/test_regimes.py runs it so).
# Every step skips finished work: rerun the same command to resume (also after kill -9).
set -euo pipefail
DATASET=${1:?usage: bash eval/regimes.sh digits|mnist5k converged|overconfident [PARALLEL]}
REGIME=${2:?usage: bash eval/regimes.sh digits|mnist5k converged|overconfident [PARALLEL]}
PARALLEL=${3:-1}
WORK=${WORK:-.cache/regimes}/$DATASET-$REGIME
SEEDS=${SEEDS:-5}
METHODS=${METHODS:-ce ls focal flsd53 mmce mbls mixup regmixup rankmixup csm}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RECIPE=train/${DATASET}_$REGIME.yaml
[ -f "$RECIPE" ] || { echo "regimes.sh: no recipe $RECIPE; use digits|mnist5k converged|overconfident" >&2; exit 2; }
STAGE=${STAGE:-all}
case "$STAGE" in all|fit|build|choose) ;; *) echo "regimes.sh: STAGE=$STAGE; use fit, build, choose or leave it unset (the whole benchmark)" >&2; exit 2 ;; esac
case "$DATASET" in
  # the generator settings that meet the quality goals (eval/results/generator-quality/)
  digits) GEN_ARGS=(--steps 1500); GROUPS_DEFAULT=512; GUIDANCE=2 ;;
  mnist5k) GEN_ARGS=(--steps 3000 --prediction-type v_prediction --snr-gamma 5); GROUPS_DEFAULT=384
           GUIDANCE=2 ;;
  *) echo "regimes.sh: unknown dataset $DATASET; use digits or mnist5k" >&2; exit 2 ;;
esac
[ -n "${GEN_STEPS:-}" ] && GEN_ARGS=(--steps "$GEN_STEPS" "${GEN_ARGS[@]:2}")
NGROUPS=${NGROUPS:-$GROUPS_DEFAULT}
SAMPLE_STEPS=${SAMPLE_STEPS:-25}  # DDIM steps per image
EPOCH_ARGS=(); [ -n "${EPOCHS:-}" ] && EPOCH_ARGS=(--epochs "$EPOCHS")
# CSM's configuration: the label mode fixed here, or chosen per regime on validation (auto)
CSM_LABEL=${CSM_LABEL:-s4}  # s4 | judge-ts | pair-fit | auto (STAGE=choose's choice)
CSM_CHOICES=${CSM_CHOICES:-s4 judge-ts pair-fit}
CHOICE=$WORK/choice
chosen() { python -c "import json; print(json.load(open('$CHOICE/choice.json'))['chosen'])"; }
CSM_SCHEDULE=${CSM_SCHEDULE:-uniform}  # uniform | targeted (from a 90-group pilot per split)
label_args() {  # label_args NAME: the csm annotate options of the label mode NAME
  case "$1" in
    s4) echo --squash 4 ;;
    judge-ts) echo --label-mode judge ;;
    pair-fit) echo --label-mode pair-fit ;;
    *) return 1 ;;
  esac
}
for name in $CSM_CHOICES; do
  label_args "$name" >/dev/null || { echo "regimes.sh: CSM_CHOICES has $name; use s4, judge-ts or pair-fit" >&2; exit 2; }
done
if [ "$CSM_LABEL" = auto ] && [ "$STAGE" = all ]; then
  [ -f "$CHOICE/choice.json" ] || { echo "regimes.sh: CSM_LABEL=auto needs the choice on validation first: STAGE=choose bash eval/regimes.sh $DATASET $REGIME" >&2; exit 2; }
  CSM_LABEL=$(chosen)
fi
[ "$CSM_LABEL" = auto ] || label_args "$CSM_LABEL" >/dev/null || { echo "regimes.sh: CSM_LABEL=$CSM_LABEL; use s4, judge-ts, pair-fit or auto" >&2; exit 2; }
case "$CSM_SCHEDULE" in uniform|targeted) ;; *) echo "regimes.sh: CSM_SCHEDULE=$CSM_SCHEDULE; use uniform or targeted" >&2; exit 2 ;; esac
OUT=${OUT:-eval/results/$DATASET-$REGIME}
# the split options of the recipe, passed to every model behind the synthetic data
read -r VAL_FRACTION PER_CLASS < <(python -c "import yaml; c = yaml.safe_load(open('$RECIPE'))
print(c.get('val_fraction', 0.1), c.get('train_per_class') or '')")
SPLIT=(--val-fraction "$VAL_FRACTION"); REAL_SPLIT=(--real-val-fraction "$VAL_FRACTION")
if [ -n "$PER_CLASS" ]; then SPLIT+=(--train-per-class "$PER_CLASS"); REAL_SPLIT+=(--real-train-per-class "$PER_CLASS"); fi

finished() { [ -f "$1/csm_synthetic.json" ] && python -c "import json,sys; sys.exit(0 if json.load(open('$1/csm_synthetic.json')).get('finalized') else 1)"; }
has_annotation() { [ -f "$1/csm_synthetic.json" ] && python -c "import json,sys; sys.exit(0 if '$2' in (json.load(open('$1/csm_synthetic.json')).get('annotations') or {}) else 1)"; }

label() {  # label DIR D ENCODER [NAME]: annotation NAME (CSM_LABEL) of DIR, real split of D
  local name=${4:-$CSM_LABEL}
  # shellcheck disable=SC2046
  has_annotation "$1" "$name" || csm annotate "$1" --real "$DATASET" --real-seed "$2" \
    "${REAL_SPLIT[@]}" --encoder "classifier:$3" --name "$name" $(label_args "$name") --device cpu
}
fit_split() {  # fit_split D: the generator and the annotation encoder of split D
  local d=$1 gen=$WORK/d$1/gen enc=$WORK/d$1/encoder-ce-seed100
  [ -f "$gen/model_index.json" ] || csm fit-diffusion --dataset "$DATASET" --preset small \
    --seed "$d" --split-seed "$d" "${SPLIT[@]}" "${GEN_ARGS[@]}" --num-threads 1 --out "$gen" \
    $( [ -d "$gen" ] && echo --resume )
  [ -f "$enc/model.safetensors" ] || csm train --config "$RECIPE" --seed 100 --data-seed "$d" \
    "${EPOCH_ARGS[@]}" --out "$enc" --overwrite
}
build_split() {  # build_split D: generator, encoder, synthetic data and labels of split D
  local d=$1 gen=$WORK/d$1/gen syn=$WORK/d$1/syn enc=$WORK/d$1/encoder-ce-seed100
  local pilot=$WORK/d$1/pilot schedule=()
  fit_split "$d"
  if [ "$CSM_SCHEDULE" = targeted ]; then  # every pair of 10 classes twice, uniform grid
    finished "$pilot" || csm generate --model "$gen" --out "$pilot" --groups 90 --steps "$SAMPLE_STEPS" \
      --guidance "$GUIDANCE" --seed "$((d + 1000))" --device cpu $( [ -d "$pilot" ] && echo --resume )
    label "$pilot" "$d" "$enc"
    schedule=(--lambda-schedule targeted --pilot "$pilot:$CSM_LABEL")
  fi
  finished "$syn" || csm generate --model "$gen" --out "$syn" --groups "$NGROUPS" --steps "$SAMPLE_STEPS" \
    --guidance "$GUIDANCE" --seed "$d" --device cpu "${schedule[@]}" \
    $( [ -d "$syn" ] && echo --resume )
  [ "$CSM_LABEL" = auto ] || label "$syn" "$d" "$enc"
}

candidates() {  # candidates D: split D's synthetic data with the label of every CSM_CHOICES mode
  build_split "$1"
  for name in $CSM_CHOICES; do label "$WORK/d$1/syn" "$1" "$WORK/d$1/encoder-ce-seed100" "$name"; done
}

SPLITS=${SPLITS:-$(seq 0 $((SEEDS - 1)))}
case "$STAGE" in  # STAGE=fit|build: only the models (and data) of SPLITS, before the choice
  fit) for d in $SPLITS; do fit_split "$d"; done; exit 0 ;;
  build) for d in $SPLITS; do candidates "$d"; done; exit 0 ;;
esac
if [ "$STAGE" = choose ]; then  # STAGE=choose: CSM's label mode, on validation only
  [ "$CSM_SCHEDULE" = uniform ] || { echo "regimes.sh: STAGE=choose compares label modes on the uniform λ grid; use CSM_SCHEDULE=uniform" >&2; exit 2; }
  for d in $(seq 0 $((SEEDS - 1))); do candidates "$d"; done
  have=$(python eval/csm_choice.py --label-of "$OUT" --seeds "$SEEDS")
  for name in $CSM_CHOICES; do
    [ "$name" = "$have" ] && continue  # the regime's own CSM runs answer for this label mode
    csm benchmark --dataset "$DATASET" --seeds "$SEEDS" --train-config "$RECIPE" "${EPOCH_ARGS[@]}" \
      --synthetic "$WORK/d{data_seed}/syn:$name" --methods csm --evaluate false --out "$CHOICE/csm-$name"
  done
  # shellcheck disable=SC2086
  python eval/csm_choice.py --runs "$OUT" "$CHOICE"/csm-* "$CHOICE"/superseded/csm-* \
    --candidates $CSM_CHOICES --seeds "$SEEDS" --out "$CHOICE"
  exit 0
fi
# CSM runs of another label mode (before a choice on validation changed it) leave OUT, kept
with_csm() { case " $METHODS " in *" csm "*) return 0 ;; esac; return 1; }  # METHODS has csm
old=$(if with_csm; then python eval/csm_choice.py --label-of "$OUT" --seeds "$SEEDS"; fi)
if [ -n "$old" ] && [ "$old" != "$CSM_LABEL" ]; then
  keep=$CHOICE/superseded/csm-$old/runs
  [ -e "$keep/csm" ] && { echo "regimes.sh: $OUT/runs/csm holds CSM runs of label mode $old and $keep/csm exists; move one of them away" >&2; exit 2; }
  mkdir -p "$keep" && mv "$OUT/runs/csm" "$keep/csm"
  echo "regimes.sh: the CSM runs of label mode $old moved to $keep/csm (CSM_LABEL=$CSM_LABEL)" >&2
fi

# the chosen mode's runs of STAGE=choose are the benchmark's CSM runs (same recipe, seeds, splits
# and synthetic data; the benchmark refuses them if any setting differs): copied, not retrained
adopt=$CHOICE/csm-$CSM_LABEL
if with_csm && [ ! -e "$OUT/runs/csm" ] \
   && [ "$(python eval/csm_choice.py --label-of "$adopt" --seeds "$SEEDS")" = "$CSM_LABEL" ]; then
  python -c "import sys; from csm.utils import claim_output; claim_output(sys.argv[1], 'benchmark')" "$OUT"
  mkdir -p "$OUT/runs" && rm -rf "$OUT/runs/.csm.copy"
  cp -r "$adopt/runs/csm" "$OUT/runs/.csm.copy" && mv "$OUT/runs/.csm.copy" "$OUT/runs/csm"
  echo "regimes.sh: the CSM runs of label mode $CSM_LABEL copied from $adopt (STAGE=choose trained them)" >&2
fi

BENCH=(--dataset "$DATASET" --seeds "$SEEDS" --train-config "$RECIPE" "${EPOCH_ARGS[@]}"
       --synthetic "$WORK/d{data_seed}/syn:$CSM_LABEL" --out "$OUT")
train_queue() {  # train_queue CLAIMS METHOD...: claim each unclaimed method and train its seeds
  local claims=$1 m; shift
  for m in "$@"; do
    mkdir "$claims/$m" 2>/dev/null || continue
    csm benchmark "${BENCH[@]}" --methods "$m" --calibrators ts --corruptions none --plots false
  done
}
PLAIN=$(for m in $METHODS; do [ "$m" = csm ] || echo "$m"; done)
if [ "$PARALLEL" -gt 1 ]; then
  # worker 1 builds every split's synthetic data (one core), then trains csm and joins the queue;
  # worker 2 starts at once on the methods that need no synthetic data
  CLAIMS=$(mktemp -d); trap 'rm -rf "$CLAIMS"' EXIT
  ( for d in $(seq 0 $((SEEDS - 1))); do build_split "$d"; done
    if with_csm; then train_queue "$CLAIMS" csm; fi
    train_queue "$CLAIMS" $PLAIN ) &
  p1=$!
  train_queue "$CLAIMS" $PLAIN &
  p2=$!
  wait "$p1"; wait "$p2"
else
  for d in $(seq 0 $((SEEDS - 1))); do build_split "$d"; done
fi
# one evaluation of every run: all calibrators, clean + every corruption, paired against CE
# shellcheck disable=SC2086
time csm benchmark "${BENCH[@]}" --methods $METHODS --calibrators all --corruptions all
mkdir -p "$OUT/annotation"
for d in $(seq 0 $((SEEDS - 1))); do
  cp "$WORK/d$d/syn/annotations/$CSM_LABEL/annotation_report.png" "$OUT/annotation/d$d-report.png"
done
cp "$WORK/d0/syn/README.md" "$OUT/annotation/dataset_card_d0.md"
if [ -f "$CHOICE/choice.json" ] && [ "$(chosen)" = "$CSM_LABEL" ]; then
  cp "$CHOICE/choice.json" "$OUT/csm_choice.json"; cp "$CHOICE/choice.md" "$OUT/csm_choice.md"
else rm -f "$OUT/csm_choice.json" "$OUT/csm_choice.md"  # CSM_LABEL was fixed by hand
fi
cp "$WORK/d0/gen/samples.png" "$OUT/annotation/diffusion_samples_d0.png"
# the repository's README headline is rewritten only from the repository's results
if [ "$(dirname "$OUT")" = eval/results ]; then python eval/summarize.py
else python eval/summarize.py --results "$(dirname "$OUT")" --readme "$(dirname "$OUT")/README.md"; fi
