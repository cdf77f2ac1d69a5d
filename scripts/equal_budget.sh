#!/usr/bin/env bash
# Issue 18's equal-budget comparison for SmolLM2-135M: every method's draft trained from scratch on the same
# target-regenerated answers, with the same steps, batch, sequence length, learning-rate schedule and seed (so
# the same training tokens in the same order), then all of them benchmarked side by side.
#
#   bash scripts/equal_budget.sh train [METHOD ...]   # default: every method, in the order below
#   bash scripts/equal_budget.sh bench                 # the six suites, 20 questions each, every method (sps,
#                                                      # medusa and hydra on their own trees and on auto)
#   bash scripts/equal_budget.sh scaling               # EAGLE-3 and EAGLE-2 drafts on 1/4 and 1/2 of the data
#   bash scripts/equal_budget.sh scaling-bench         # tau on MT-bench at 1/4, 1/2, all; 60,5,10 and auto
#
# The budget is one epoch of the data (STEPS, default 440 steps of 8 conversations); the data-scaling runs
# keep the recipe and the epoch, on a seeded shuffle's first quarter and half (runs/regen/answers-q*.jsonl),
# and "all" is the equal-budget run itself.
#
# Needs runs/regen/answers.jsonl (the target's own answers):
#   python scripts/regen_prompts.py --more 3000
#   eagle3 regenerate --data runs/regen/prompts.jsonl --out runs/regen/answers.jsonl --max-new-tokens 128 \
#       --batch-size 16 --runtime native --threads 2 --limit 3300
# Settings: the default (cpu) recipe with the overrides below. Each run lives in runs/equal/METHOD; a stopped
# run (Ctrl-C, SIGTERM) continues exactly where it stopped when this script is run again. Each run's
# summary.json says its CPU-hours (per session: sum them when resumed).
set -euo pipefail
cd "$(dirname "$0")/.."
EAGLE3=${EAGLE3:-.venv/bin/eagle3}  # a command, split on spaces (e.g. ".venv/bin/python -m eagle3")
DATA=runs/regen/answers.jsonl
STEPS=${STEPS:-440}
COMMON=(--target smollm2-135m --data "$DATA" --steps "$STEPS" --batch-size 4 --grad-accum 2 --lr 5e-4 --warmup 30
        --max-length 512 --seed 0 --save-every 25 --eval-conversations 8 --threads 2)
declare -A EXTRA=(
  [eagle3]="--method eagle3"
  [eagle]="--method eagle"
  [hass]="--method hass --ttt-steps 3"
  [medusa]="--method medusa --heads 4 --head-layers 1"
  [hydra]="--method hydra --heads 4 --head-layers 1"
  [sps]="--method sps --lm-layers 4 --lm-hidden 256"
)
ORDER=(eagle3 eagle hass medusa hydra sps)

train() {
  [ -f "$DATA" ] || { echo "error: $DATA is missing (see the top of this script)" >&2; exit 2; }
  for method in "${@:-${ORDER[@]}}"; do
    [ -n "${EXTRA[$method]:-}" ] || { echo "error: unknown method $method (${ORDER[*]})" >&2; exit 2; }
    out=runs/equal/$method
    resume=()
    [ -f "$out/train_state.pt" ] && resume=(--resume)
    [ -f "$out/summary.json" ] && grep -q "\"steps\": $STEPS," "$out/summary.json" && { echo "$method: done"; continue; }
    echo "== $method $(date -u +%H:%M)"
    # shellcheck disable=SC2086
    $EAGLE3 train "${COMMON[@]}" ${EXTRA[$method]} --out "$out" "${resume[@]}"
  done
}

bench() {
  # shellcheck disable=SC2086
  $EAGLE3 bench --suites mt_bench,humaneval,gsm8k,alpaca,cnn_dm,natural_questions \
    --methods vanilla,sps,pld,medusa,hydra,eagle,eagle2,hass,eagle3 --limit 20 --max-new-tokens 64 \
    --draft runs/equal/eagle3/draft --assistant runs/equal/sps/draft --medusa runs/equal/medusa/draft \
    --hydra runs/equal/hydra/draft --eagle runs/equal/eagle/draft --hass runs/equal/hass/draft \
    --tree auto --fixed-tree static:10 --also-auto --runtime native --threads 2 --out runs/equal/bench "$@"
}

scaling() {
  [ -f "$DATA" ] || { echo "error: $DATA is missing (see the top of this script)" >&2; exit 2; }
  for part in 4 2; do  # a quarter and a half of the conversations, the same seeded shuffle for both
    subset=runs/regen/answers-q$part.jsonl
    [ -f "$subset" ] || python3 -c "import random, sys; rows = open(sys.argv[1]).read().splitlines(); \
random.Random(0).shuffle(rows); open(sys.argv[2], 'w').write(''.join(r + '\n' for r in rows[: len(rows) // $part]))" \
      "$DATA" "$subset"
    for method in eagle3 eagle; do
      out=runs/scaling/$method-1of$part
      resume=()
      [ -f "$out/train_state.pt" ] && resume=(--resume)
      [ -f "$out/summary.json" ] && { echo "$out: done"; continue; }
      echo "== $out $(date -u +%H:%M)"
      # shellcheck disable=SC2086
      $EAGLE3 train "${COMMON[@]/$DATA/$subset}" ${EXTRA[$method]} --steps $((STEPS / part)) --out "$out" "${resume[@]}"
    done
  done
}

scaling_bench() {  # $1: 4, 2 or 1 (all: the equal-budget drafts); both trees in one run, beside one vanilla
  local folder=runs/scaling suffix=-1of$1
  [ "$1" = 1 ] && folder=runs/equal suffix=
  # shellcheck disable=SC2086
  $EAGLE3 bench --suites mt_bench --methods vanilla,eagle3,eagle2 --limit 40 --max-new-tokens 64 --tree 60,5,10 auto \
    --draft "$folder/eagle3$suffix/draft" --eagle "$folder/eagle$suffix/draft" --runtime native \
    --threads 2 --out "runs/scaling/bench-1of$1" "${@:2}"
}

case "${1:-}" in
  train) shift; train "$@" ;;
  bench) shift; bench "$@" ;;
  scaling) shift; scaling ;;
  scaling-bench) shift; for part in 4 2 1; do scaling_bench "$part" "$@"; done ;;
  *) echo "usage: bash scripts/equal_budget.sh train [METHOD ...] | bench [--resume] | scaling | scaling-bench [--resume]" >&2
     exit 2 ;;
esac
