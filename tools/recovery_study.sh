#!/usr/bin/env bash
# Recovery study (issue 7): drop vs fold-vo vs linear on one model at k = 2, 4, 6 attention sublayers
# removed in per-head Gate-Norm order. Writes GGUFs and JSON into OUT; docs/study-recovery.md reports them.
# Usage: tools/recovery_study.sh MODEL OUT [CHUNKS] [KS]   (PHASES="prune ppl bench" by default)
set -euo pipefail
MODEL=${1:?model GGUF}; OUT=${2:?output folder}; CHUNKS=${3:-4}; KS=${4:-"2 4 6"}
PHASES=${PHASES:-"prune ppl bench"}
has() { [[ " $PHASES " == *" $1 "* ]]; }
SHARED=$(cd "$(dirname "$0")/../.." && pwd)/shared
WIKI=$SHARED/data/wikitext-2-raw/wiki.test.raw            # evaluation text
CALIB=$SHARED/data/tinystories/tinystories_val_subset.txt  # calibration / alpha-search text (not evaluation)
GE="python -m gatenorm_edge"
mkdir -p "$OUT"
name=$(basename "$MODEL" .gguf)
has prune && $GE score "$MODEL" --json "$OUT/$name-scores.json" > /dev/null
has prune && for k in $KS; do
  plan=(--plan "$OUT/$name-scores.json" --count "$k" --force)
  $GE prune "$MODEL" "$OUT/k$k-drop.gguf" "${plan[@]}" --mode drop --json "$OUT/k$k-drop.prune.json"
  $GE prune "$MODEL" "$OUT/k$k-fold-vo.gguf" "${plan[@]}" --mode fold-vo --json "$OUT/k$k-fold-vo.prune.json"
  $GE prune "$MODEL" "$OUT/k$k-fold-vo-search.gguf" "${plan[@]}" --mode fold-vo \
    --alpha-search "$CALIB" --json "$OUT/k$k-fold-vo-search.prune.json"
  $GE prune "$MODEL" "$OUT/k$k-linear.gguf" "${plan[@]}" --mode linear --calib "$CALIB" \
    --calib-tokens 2048 --calib-ctx 512 --json "$OUT/k$k-linear.prune.json"
done
has ppl && $GE ppl "$MODEL" --text "$WIKI" --ctx 512 --chunks "$CHUNKS" --json "$OUT/base.ppl.json"
has ppl && for k in $KS; do
  for mode in drop fold-vo fold-vo-search linear; do
    $GE ppl "$OUT/k$k-$mode.gguf" --text "$WIKI" --ctx 512 --chunks "$CHUNKS" --json "$OUT/k$k-$mode.ppl.json"
  done
done
has bench && for k in $KS; do
  for mode in drop fold-vo linear; do
    $GE bench "$MODEL" --vs "$OUT/k$k-$mode.gguf" --prompt 128 --gen 32 --depth 0 --reps 3 \
      --json "$OUT/k$k-$mode.bench.json"
  done
done
