#!/usr/bin/env bash
# The UNDO loop as plain stage commands: what `undo iterate` runs, written out in bash.
#
#   bash examples/undo_loop.sh --config examples/run.toml --name bash-loop
#
# It takes `undo iterate`'s own flags (a run.toml, any top-level flag, dotted stage flags such as
# --train.lr 2e-5) and asks `undo iterate --dry-run --format shell` for the settings: the models,
# files and stopping rule, and each stage's flags exactly as `undo iterate` would run that stage
# with the same config (epochs, lr, warmup, max tokens, k, ...). So this script trains and
# generates as `undo iterate --config ...` does, into its own run folder (runs_dir/name: give it
# another --name than the `undo iterate` run's).
#
# It writes the same files in the same layout as `undo iterate` (iter_00/rationales.jsonl,
# iter_NN/{refined,train_data,errors}.jsonl, iter_NN/student/, iter_NN/{val,test}/...; the
# layout is defined in undo_cli/loop/layout.py and a test keeps this script in step), so
# `undo report $OUT` reads it too. What `undo iterate` adds on top: manifest.json (config,
# versions, input hashes, stage status and timings), summary.json, refusing to resume with a
# changed config, a teacher budget for the whole run, and one process that frees each model
# before loading the next.
#
# Re-running the same command after a kill resumes it: generate, evaluate and refine skip the
# records already on disk, `undo train --resume` continues from its last checkpoint (or
# returns at once when it finished), collect-errors and mix rewrite small files.
#
# UNDO (default: undo) is the command to run, e.g. UNDO="python -m undo_cli".
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: bash $0 --config RUN.toml --name NAME [any undo iterate flag]" >&2
  exit 2
fi
read -r -a undo <<< "${UNDO:-undo}"
# This script runs each next step itself, so its stages print no `next:` line (undo_cli/guidance.py); the
# report at the end does.
export UNDO_NEXT=0
# TEACHER STUDENT TRAIN VAL TEST OUT MAX_ITERATIONS PATIENCE MIN_DELTA MIX INIT ADAPTER_ONLY REFINE_SELECT and
# the arrays CLUSTER_ARGS GENERATE_ARGS TRAIN_ARGS EVALUATE_ARGS COLLECT_ERRORS_ARGS REFINE_ARGS
# (undo_cli/loop/script.py).
settings=$("${undo[@]}" iterate "$@" --dry-run --format shell)
eval "$settings"

it() { printf '%s/iter_%02d' "$OUT" "$1"; }
accuracy() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["accuracy"])' "$1"; }
# exit 0 when $1 beats $2 by at least $3 (and by something at all): the same rule as `undo iterate`
improves() { python3 -c 'import sys; a, b, m = map(float, sys.argv[1:]); sys.exit(0 if a > b and a - b >= m - 1e-12 else 1)' "$@"; }

evaluate() {  # $1 = iteration, $2 = val|test, $3 = problems; the student as `undo iterate` evaluates it
  local d; d=$(it "$1")
  local model=(--model "$d/student")
  if [ "$ADAPTER_ONLY" = 1 ]; then model=(--model "$(base "$1")" --adapter "$d/student"); fi
  "${undo[@]}" evaluate "${model[@]}" --input "$3" --output "$d/$2/predictions.jsonl" \
    --metrics "$d/$2/predictions.metrics.json" "${EVALUATE_ARGS[@]}"
}
base() {  # the model iteration $1 starts from
  if [ "$INIT" = previous ] && [ "$1" -gt 0 ]; then it $(($1 - 1)); printf /student; else printf '%s' "$STUDENT"; fi
}

# train, evaluate on val, collect errors: the second half of every iteration
train_and_diagnose() {  # $1 = iteration, $2 = training data
  local d; d=$(it "$1")
  "${undo[@]}" train --student "$(base "$1")" --data "$2" --output "$d/student" --resume "${TRAIN_ARGS[@]}"
  evaluate "$1" val "$VAL"
  "${undo[@]}" collect-errors "$d/val/predictions.jsonl" --output "$d/errors.jsonl" "${COLLECT_ERRORS_ARGS[@]}"
}

# --- iteration 0: one-shot distillation ---------------------------------------------------
# the failure clusters, once: every round's failures map to the same ids (undo cluster)
mkdir -p "$OUT"
"${undo[@]}" cluster "$TRAIN" "$VAL" --output "$OUT/clusters.json" "${CLUSTER_ARGS[@]}"
d=$(it 0)
"${undo[@]}" generate --teacher "$TEACHER" --input "$TRAIN" --output "$d/rationales.jsonl" --iteration 0 \
  "${GENERATE_ARGS[@]}"
data="$d/rationales.jsonl"
train_and_diagnose 0 "$data"

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
  history=()  # --select clusters: which clusters the last round's refinements fixed
  if [ "$REFINE_SELECT" = clusters ] && [ "$k" -ge 2 ]; then history=(--previous-errors "$(it $((k - 2)))/errors.jsonl"); fi
  "${undo[@]}" refine --teacher "$TEACHER" --errors "$prev/errors.jsonl" --targets "$data" \
    --output "$d/refined.jsonl" --iteration "$k" --clusters "$OUT/clusters.json" "${history[@]}" "${REFINE_ARGS[@]}"
  "${undo[@]}" mix --base "$data" --refined "$d/refined.jsonl" --mode "$MIX" --output "$d/train_data.jsonl"
  data="$d/train_data.jsonl"
  train_and_diagnose "$k" "$data"

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
  evaluate "$k" test "$TEST"
done
echo "best iteration: $best (validation accuracy $best_acc)" >&2
UNDO_NEXT=1 "${undo[@]}" report "$OUT"
