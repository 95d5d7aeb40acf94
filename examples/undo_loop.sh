#!/usr/bin/env bash
# The UNDO loop as plain stage commands: what `undo iterate` runs, written out in bash.
#
#   TEACHER=undo-demo/models/teacher STUDENT=undo-demo/models/student \
#   TRAIN=undo-demo/data/train.jsonl VAL=undo-demo/data/val.jsonl TEST=undo-demo/data/test.jsonl \
#   OUT=runs/bash-loop bash examples/undo_loop.sh
#
# It writes the same files in the same layout as `undo iterate` (iter_00/rationales.jsonl,
# iter_NN/{refined,train_data,errors}.jsonl, iter_NN/student/, iter_NN/{val,test}/...; the
# layout is defined in undo_cli/loop/layout.py and a test keeps this script in step), so
# `undo report $OUT` reads it too. What `undo iterate` adds on top: manifest.json (config,
# versions, input hashes, stage status and timings), summary.json, refusing to resume with a
# changed config, and one process that frees each model before loading the next.
#
# Re-running the script after a kill resumes it: generate, evaluate and refine skip the
# records already on disk, `undo train --resume` continues from its last checkpoint (or
# returns at once when it finished), collect-errors and mix rewrite small files.
#
# Settings (environment variables; defaults match `undo iterate`'s):
#   TEACHER STUDENT TRAIN VAL TEST   models and problem files (required)
#   OUT                              run folder                         [runs/bash-loop]
#   MAX_ITERATIONS PATIENCE MIN_DELTA refinement rounds and stopping     [3, 1, 0]
#   MIX (replace|append)  INIT (base|previous)  SEED                    [replace, base, 0]
#   GENERATE_ARGS TRAIN_ARGS EVALUATE_ARGS REFINE_ARGS COLLECT_ARGS      extra flags per stage
#       e.g. TRAIN_ARGS="--epochs 1 --lr 2e-5" GENERATE_ARGS="--backend vllm"
set -euo pipefail

: "${TEACHER:?set TEACHER to the teacher model}" "${STUDENT:?set STUDENT to the base student}"
: "${TRAIN:?set TRAIN to the training problems}" "${VAL:?set VAL}" "${TEST:?set TEST}"
OUT=${OUT:-runs/bash-loop}
MAX_ITERATIONS=${MAX_ITERATIONS:-3} PATIENCE=${PATIENCE:-1} MIN_DELTA=${MIN_DELTA:-0}
MIX=${MIX:-replace} INIT=${INIT:-base} SEED=${SEED:-0}
# Word-split on purpose: each holds several flags.
read -r -a generate_args <<< "${GENERATE_ARGS:-}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
read -r -a evaluate_args <<< "${EVALUATE_ARGS:-}"
read -r -a refine_args <<< "${REFINE_ARGS:-}"
read -r -a collect_args <<< "${COLLECT_ARGS:-}"
UNDO=${UNDO:-undo}

it() { printf '%s/iter_%02d' "$OUT" "$1"; }
accuracy() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["accuracy"])' "$1"; }
# exit 0 when $1 beats $2 by at least $3 (and by something at all): the same rule as `undo iterate`
improves() { python3 -c 'import sys; a, b, m = map(float, sys.argv[1:]); sys.exit(0 if a > b and a - b >= m - 1e-12 else 1)' "$@"; }

# train, evaluate on val, collect errors: the second half of every iteration
train_and_diagnose() {  # $1 = iteration, $2 = training data, $3 = model to start from
  local d; d=$(it "$1")
  "$UNDO" train --student "$3" --data "$2" --output "$d/student" --seed "$SEED" --resume "${train_args[@]}"
  "$UNDO" evaluate --model "$d/student" --input "$VAL" --output "$d/val/predictions.jsonl" \
    --metrics "$d/val/predictions.metrics.json" --seed "$SEED" "${evaluate_args[@]}"
  "$UNDO" collect-errors "$d/val/predictions.jsonl" --output "$d/errors.jsonl" --seed "$SEED" "${collect_args[@]}"
}

# --- iteration 0: one-shot distillation ---------------------------------------------------
d=$(it 0)
"$UNDO" generate --teacher "$TEACHER" --input "$TRAIN" --output "$d/rationales.jsonl" --iteration 0 \
  --seed "$SEED" "${generate_args[@]}"
data="$d/rationales.jsonl"
train_and_diagnose 0 "$data" "$STUDENT"

best=0
best_acc=$(accuracy "$d/val/predictions.metrics.json")
reference=$best_acc
stale=0

# --- iterations 1..MAX_ITERATIONS: refine what the student got wrong, retrain --------------
for ((k = 1; k <= MAX_ITERATIONS; k++)); do
  prev=$(it $((k - 1)))
  d=$(it "$k")
  if [ ! -s "$prev/errors.jsonl" ]; then
    echo "no validation errors left to refine; stopping" >&2
    break
  fi
  "$UNDO" refine --teacher "$TEACHER" --errors "$prev/errors.jsonl" --targets "$data" \
    --output "$d/refined.jsonl" --iteration "$k" --seed "$SEED" "${refine_args[@]}"
  "$UNDO" mix --base "$data" --refined "$d/refined.jsonl" --mode "$MIX" --output "$d/train_data.jsonl"
  data="$d/train_data.jsonl"
  start=$STUDENT
  if [ "$INIT" = previous ]; then start="$prev/student"; fi
  train_and_diagnose "$k" "$data" "$start"

  acc=$(accuracy "$d/val/predictions.metrics.json")
  if improves "$acc" "$best_acc" 0; then best=$k; best_acc=$acc; fi   # best: highest, earliest on a tie
  if improves "$acc" "$reference" "$MIN_DELTA"; then reference=$acc; stale=0; else stale=$((stale + 1)); fi
  if [ "$stale" -ge "$PATIENCE" ]; then
    echo "no validation gain (min_delta $MIN_DELTA) for $PATIENCE iteration(s); stopping" >&2
    break
  fi
done

# --- held-out test: the best student and the one-shot student -----------------------------
for k in $(printf '%s\n' 0 "$best" | sort -un); do
  d=$(it "$k")
  "$UNDO" evaluate --model "$d/student" --input "$TEST" --output "$d/test/predictions.jsonl" \
    --metrics "$d/test/predictions.metrics.json" --seed "$SEED" "${evaluate_args[@]}"
done
echo "best iteration: $best (validation accuracy $best_acc)" >&2
"$UNDO" report "$OUT"
