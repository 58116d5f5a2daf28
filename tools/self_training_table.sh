#!/usr/bin/env bash
# The toy self-training table of issue 17 (README "Self-training"): SYNTHIA -> Cityscapes on the built-in toy data,
# per seed: source only, adversarial (MTL, mTEB), self-training (MTL, mTEB), self-training + adversarial (mTEB),
# oracle; then the comparison table on the target split.
#
#   tools/self_training_table.sh [OUT=runs/toy_st] [SEEDS="1 2 3"] [ITERATIONS=150]
#
# Environment: OUT, SEEDS, ITERATIONS as above; PYTHON (default .venv/bin/python); UDA_THREADS (threads per run,
# e.g. 1 when several runs share a machine); EXTRA (more key=value overrides for every run, e.g.
# "self_training.mix=depthmix"). Runs that finished already (their metrics.json exists) are skipped, so the
# script can be rerun after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/toy_st}}
SEEDS=${SEEDS:-"1 2 3"}
ITERATIONS=${ITERATIONS:-150}
PYTHON=${PYTHON:-.venv/bin/python}
EXTRA=${EXTRA:-}

run() {  # run NAME ARGS...: one recipe run into $OUT/NAME-s$seed unless it finished
  local name=$1
  shift
  local out="$OUT/$name-s$seed"
  if [[ -f "$out/metrics.json" ]]; then
    echo "skip $out (done)"
    return
  fi
  echo "run $out"
  local start=$SECONDS
  # shellcheck disable=SC2086  # EXTRA is a list of overrides
  "$PYTHON" recipes/synthia2cityscapes.py --toy --seed "$seed" --out "$out" --resume "$@" \
    "train.iterations=$ITERATIONS" $EXTRA >"$out.log" 2>&1 || { echo "failed: see $out.log"; exit 1; }
  echo "  $((SECONDS - start)) s"
}

mkdir -p "$OUT"
for seed in $SEEDS; do
  run source-mtl --model mtl --no-adapt
  run uda-mtl --model mtl --method adversarial
  run uda-mteb --model mteb --method adversarial
  run st-mtl --model mtl --method self-training
  run st-mteb --model mteb --method self-training
  run st-adv-mteb --model mteb --method self-training+adversarial
  run oracle-mtl --model mtl --oracle
done
"$PYTHON" tools/compare.py "$OUT"/*/ --split target --baseline synthia2cityscapes-source-mtl
