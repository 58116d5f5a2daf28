#!/usr/bin/env bash
# The toy self-training table of issue 17 (README "Self-training"): SYNTHIA -> Cityscapes on the built-in toy data.
#
# Protocol (warm start): per seed, a source-only start of ITERATIONS steps for each architecture (MTL, mTEB;
# pre-*), then every row continues its start for ITERATIONS more steps with its method: source only (MTL, mTEB),
# target BatchNorm statistics alone (AdaBN, mTEB), adversarial (MTL, mTEB), self-training (MTL, mTEB),
# self-training + adversarial (mTEB), self-training + photometric target depth (mTEB), oracle (target labels).
# Every row thus sees 2 x ITERATIONS steps and the same start. The adapting rows run with train.bn_mode=$BN
# (default domain: target images are normalised by target statistics; BN=separate gives the table before it). Self-training needs the warm start: from scratch, the
# teacher of a toy model without ImageNet weights is almost never confident within the toy schedule (README).
#
#   tools/self_training_table.sh [OUT=runs/toy_st] [SEEDS="1 2 3"] [ITERATIONS=150]
#
# Environment: OUT, SEEDS, ITERATIONS as above; PYTHON (default .venv/bin/python); UDA_THREADS (threads per run,
# e.g. 1 when several runs share a machine); ST (the self-training overrides of the table, default
# "self_training.class_portion=0.5 self_training.confidence_gate=true"); EXTRA (more key=value overrides for
# every run); BN (train.bn_mode of the adapting rows, default domain); ROWS (the rows to run, default all:
# source-mtl source-mteb adabn-mteb uda-mtl uda-mteb st-mtl st-mteb st-adv-mteb st-photo-mteb oracle-mtl; their
# starts run as needed). Runs that finished already (their metrics.json exists) are skipped, so the script can be rerun
# after an interruption, or run once per seed in parallel (SEEDS=1, SEEDS=2, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/toy_st}}
SEEDS=${SEEDS:-"1 2 3"}
ITERATIONS=${ITERATIONS:-150}
PYTHON=${PYTHON:-.venv/bin/python}
ST=${ST:-"self_training.class_portion=0.5 self_training.confidence_gate=true"}
EXTRA=${EXTRA:-}
BN=${BN:-domain}
ROWS=${ROWS:-"source-mtl source-mteb adabn-mteb uda-mtl uda-mteb st-mtl st-mteb st-adv-mteb st-photo-mteb oracle-mtl"}

run() {  # run NAME ARGS...: one recipe run into $OUT/NAME-s$seed unless it finished or is not in ROWS
  local name=$1
  shift
  if [[ $name == pre-* ]]; then  # a start runs only if a requested row continues it
    [[ " $ROWS " == *"${name#pre}"[\ ]* ]] || return 0
  elif [[ " $ROWS " != *" $name "* ]]; then
    return 0
  fi
  local out="$OUT/$name-s$seed"
  if [[ -f "$out/metrics.json" ]]; then
    echo "skip $out (done)"
    return
  fi
  echo "run $out"
  local start=$SECONDS resume=()
  [[ -d $out ]] && resume=(--resume)  # an interrupted run continues (a new one is started without the flag)
  # shellcheck disable=SC2086  # EXTRA is a list of overrides
  "$PYTHON" recipes/synthia2cityscapes.py --toy --seed "$seed" --out "$out" "${resume[@]}" "$@" \
    "train.iterations=$ITERATIONS" $EXTRA >"$out.log" 2>&1 || { echo "failed: see $out.log"; exit 1; }
  echo "  $((SECONDS - start)) s"
}

mkdir -p "$OUT"
for seed in $SEEDS; do
  run pre-mtl --model mtl --no-adapt
  run pre-mteb --model mteb --no-adapt
  from_mtl="train.init_from=$OUT/pre-mtl-s$seed"
  from_mteb="train.init_from=$OUT/pre-mteb-s$seed"
  # shellcheck disable=SC2086  # ST is a list of overrides
  bn="train.bn_mode=$BN"
  {
    run source-mtl --model mtl --no-adapt "$from_mtl"
    run source-mteb --model mteb --no-adapt "$from_mteb"
    run adabn-mteb --model mteb --method adabn "$from_mteb"
    run uda-mtl --model mtl --method adversarial "$bn" "$from_mtl"
    run uda-mteb --model mteb --method adversarial "$bn" "$from_mteb"
    run st-mtl --model mtl --method self-training $ST "$bn" "$from_mtl"
    run st-mteb --model mteb --method self-training $ST "$bn" "$from_mteb"
    run st-adv-mteb --model mteb --method self-training+adversarial $ST "$bn" "$from_mteb"
    run st-photo-mteb --model mteb --method self-training --target-depth photometric $ST "$bn" "$from_mteb"
    run oracle-mtl --model mtl --oracle "$from_mtl"
  }
done
rows=()  # the finished rows, not the pre-* starts
for metrics in "$OUT"/*/metrics.json; do
  [[ $metrics == */pre-* ]] || rows+=("$(dirname "$metrics")")
done
"$PYTHON" tools/compare.py "${rows[@]}" --split target --baseline synthia2cityscapes-source-mtl
