#!/usr/bin/env bash
# Full-data runs on one GPU, packed to fit one device command (docs/results.md,
# "Full data on a GPU"):
#   1. bench/train_step.py (GPU and CPU rows, one run);
#   2. tier 1: both rankers trained on all of ICD-10-CM's and HPO's train splits,
#      evaluated on all of each test split with BM25's own ranking beside them;
#   3. bench/curvature.py tables 2 and 3 (penalised training step, stored bytes);
#   4. ICD-10-CM -> HPO from the ICD-10-CM transformer (one epoch of all of HPO's
#      train split): no penalty, EWC and KFC at three lambdas each, every model
#      evaluated on both test splits;
#   5. bench/curvature.py table 1 (estimation passes vs the peers) with the time left.
# Steps 2 and 4 run their trainings side by side on the one GPU (each is too small
# to fill it); the benchmarks run alone.
#
#   experiments/gpu_full_data.sh TASKS_DIR ENCODER_DIR OUT_DIR [BUDGET_S]
#
# TASKS_DIR holds icd10cm/ and hpo/ from
#   kronlink build-tasks --out TASKS_DIR --tasks icd10cm,hpo --candidates 10
# ENCODER_DIR is a local BERT folder (all-MiniLM-L6-v2, or its first 3 layers).
# SMOKE=1 caps every split to a few queries (a CPU check of the script itself);
# SKIP_BENCH=1 leaves out the benchmarks; TIER1="t_icd c_hpo" trains only those
# tier-1 models (t_/c_: transformer/CNN; the continual step needs t_icd).
set -uo pipefail
TASKS=$1 ENC=$2 OUT=$3 BUDGET=${4:-540}
START=$(date +%s)
M=${MODELS_DIR:-/tmp/kronlink-gpu-models}
K="python3 -m kronlink.cli"
DEV=${DEVICE:-cuda}
mkdir -p "$M" "$OUT"
left() { echo $((BUDGET - ($(date +%s) - START))); }
log() { echo "[$(($(date +%s) - START)) s] $*"; }
cap() { if [ "$(left)" -lt "$1" ]; then left; else echo "$1"; fi; }

LIM=() EVLIM=() STEPS=(--steps 20 --warmup 3) CURV=(--repeats 5) FLIM=3000
if [ "${SMOKE:-0}" = 1 ]; then
    LIM=(--limit 48 --dev-limit 16) EVLIM=(--limit 16) STEPS=(--steps 1 --warmup 1)
    CURV=(--repeats 1 --batches 1 --batch-size 2 --candidates 3) FLIM=16
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
log "1. train_step"
timeout "$(cap 120)" python3 bench/train_step.py "${STEPS[@]}" | tee "$OUT/train_step.md"
fi

TR=(--model transformer --encoder "$ENC" --epochs 3 --batch-size 32 --lr 3e-4 --head-lr 3e-3
    --evals-per-epoch 2 --seed 0 --device "$DEV")
CNN=(--model cnn --encoder "$ENC" --epochs 5 --batch-size 32 --lr 1e-3 --head-lr 1e-3
    --seed 0 --device "$DEV")

train() {  # name, then train options (each stopped after $TMO s); its JSON summary (or its last error lines) to runs.log
    local name=$1 rc
    shift
    timeout "$TMO" $K train --out "$M/$name" "${LIM[@]}" "$@" >"$M/$name.json" 2>"$M/$name.log"
    rc=$?
    echo "== train $name rc=$rc $(cat "$M/$name.json")" >>"$OUT/runs.log"
    [ $rc = 0 ] || tr '\r' '\n' <"$M/$name.log" | grep -v '^train:' | tail -5 >>"$OUT/runs.log"
}
evaluate() {  # model name, task
    $K evaluate --model "$M/$1" --task "$TASKS/$2" --split test --baseline --json \
        --device "$DEV" "${EVLIM[@]}" 2>>"$OUT/runs.log" \
        | sed "s/^/{\"model\": \"$1\", \"task\": \"$2\", \"result\": /; s/\$/}/" \
            >>"$OUT/evaluations.jsonl"
}

log "2. tier 1 (4 trainings side by side)"
T0=$(date +%s) TMO=$(cap 240)
want() { [[ " ${TIER1:-t_icd c_icd t_hpo c_hpo} " == *" $1 "* ]]; }
! want t_icd || train t_icd --task "$TASKS/icd10cm" "${TR[@]}" &
! want c_icd || train c_icd --task "$TASKS/icd10cm" "${CNN[@]}" &
! want t_hpo || train t_hpo --task "$TASKS/hpo" "${TR[@]}" --epochs 2 &
! want c_hpo || train c_hpo --task "$TASKS/hpo" "${CNN[@]}" &
wait
log "tier 1 trainings took $(($(date +%s) - T0)) s"
for m in t_icd c_icd; do ! want $m || evaluate $m icd10cm & done
for m in t_hpo c_hpo; do ! want $m || evaluate $m hpo & done
wait

if [ "${SKIP_BENCH:-0}" != 1 ]; then
log "3. curvature tables 2,3"
timeout "$(cap 120)" python3 bench/curvature.py --device "$DEV" --tables 2,3 "${CURV[@]}" \
    | tee "$OUT/curvature_23.md"
fi

log "4. ICD-10-CM -> HPO"
$K fisher --model "$M/t_icd" --task "$TASKS/icd10cm" --out "$M/t_icd.state.safetensors" \
    --limit "$FLIM" --kinds kfac,diag --batch-size 32 --device "$DEV" >>"$OUT/runs.log" 2>"$M/fisher.log"
CONT=(--task "$TASKS/hpo" "${TR[@]}" --epochs 1 --init "$M/t_icd")
P=(--prior "$M/t_icd.state.safetensors")
T0=$(date +%s) TMO=$(cap 270)
train h_none "${CONT[@]}" --method none &
for lam in 10 100 1000; do
    train "h_kfc_$lam" "${CONT[@]}" --method kfc "${P[@]}" --lambda $lam &
    train "h_ewc_$lam" "${CONT[@]}" --method ewc "${P[@]}" --lambda $lam &
done
wait
log "continual trainings took $(($(date +%s) - T0)) s"
for m in h_none h_kfc_10 h_kfc_100 h_kfc_1000 h_ewc_10 h_ewc_100 h_ewc_1000; do
    [ -f "$M/$m/config.json" ] || continue
    evaluate $m hpo &
    evaluate $m icd10cm &
done
wait

log "5. curvature table 1 ($(left) s left)"
if [ "$(left)" -gt 40 ] && [ "${SKIP_BENCH:-0}" != 1 ]; then
    timeout "$(($(left) - 15))" python3 bench/curvature.py --device "$DEV" --tables 1 \
        "${CURV[@]}" --row-timeout 60 | tee "$OUT/curvature_1.md"
fi
log "done"
