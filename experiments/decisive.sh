#!/usr/bin/env bash
# The decisive experiment (issue 15; pre-registered in docs/experiments.md) in
# one device command of at most 10 minutes:
#
#   experiments/decisive.sh INPUTS OUT [BUDGET_S]
#
# INPUTS: from `python -m kronlink.experiments.decisive prepare INPUTS
#   --tasks-from BUILT` (task subsets without definitions, the encoder in fp16;
#   under 64 MiB: it travels as a carried path).
# OUT: the device's $OUT. Every run record is written to OUT/results/runs/ as
#   that run finishes, so a timeout still returns what ran. Weights and
#   curvature states stay in SCRATCH (default /tmp/kronlink-decisive-scratch).
# BUDGET_S (default 540): no run starts that would not end inside it (the dry
#   run's per-run guess, then the longest run of its kind so far).
# Resumable: copy a previous OUT/results into OUT/results first (RESUME=dir
#   does that); stored runs are skipped. Exit code 3: stopped by the budget.
# SMOKE=1: the CPU smoke form (tiny subsets, 1 encoder layer; tests/experiments).
set -uo pipefail
INPUTS=$1 OUT=$2 BUDGET=${3:-540}
START=$(date +%s)
PY=${PYTHON:-python3}
MODE=()
[ "${SMOKE:-0}" = 1 ] && MODE=(--smoke)
mkdir -p "$OUT"
if [ -n "${RESUME:-}" ] && [ -d "$RESUME/results" ]; then
    mkdir -p "$OUT/results" && cp -rn "$RESUME/results/." "$OUT/results/"
fi
# The predicted seconds per phase, before anything runs.
$PY -m kronlink.experiments.decisive dry-run "$INPUTS" "${MODE[@]}" | tee "$OUT/dry_run.md"
LEFT=$((BUDGET - ($(date +%s) - START)))
$PY -m kronlink.experiments.decisive run "$INPUTS" "$OUT" --budget "$LEFT" \
    --device "${DEVICE:-cuda}" --profile "${PROFILE:-h200}" "${MODE[@]}" \
    --scratch "${SCRATCH:-/tmp/kronlink-decisive-scratch}" 2> >(tee "$OUT/run.log" >&2)
rc=$?
echo "decisive.sh: rc=$rc after $(($(date +%s) - START)) s; records in $OUT/results, report in $OUT/report.md"
exit $rc
