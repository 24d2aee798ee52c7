#!/usr/bin/env bash
# Recovery study (issue 7): drop vs fold-vo vs linear on one model at k = 2, 4, 6 attention sublayers
# removed in per-head Gate-Norm order. Writes GGUFs and JSON into OUT; docs/study-recovery.md reports them.
# Usage: tools/recovery_study.sh MODEL OUT [CHUNKS] [KS]
#   PHASES="prune ppl bench" (default all); MODES="drop fold-vo fold-vo-search linear linear-wiki" (default);
#   BENCH_THREADS=N passes --threads N to bench (default: all cores); BENCH_REPS=N (default 3).
#   linear calibrates on TinyStories; linear-wiki on the last 401 lines of wiki.test.raw (lines 3958-4358),
#   which the evaluated chunks (the first ~9 KB per 4 chunks of 512 tokens) never reach.
set -euo pipefail
MODEL=${1:?model GGUF}; OUT=${2:?output folder}; CHUNKS=${3:-4}; KS=${4:-"2 4 6"}
PHASES=${PHASES:-"prune ppl bench"}
MODES=${MODES:-"drop fold-vo fold-vo-search linear linear-wiki"}
has() { [[ " $PHASES " == *" $1 "* ]]; }
SHARED=$(cd "$(dirname "$0")/../.." && pwd)/shared
WIKI=$SHARED/data/wikitext-2-raw/wiki.test.raw            # evaluation text
CALIB=$SHARED/data/tinystories/tinystories_val_subset.txt  # calibration / alpha-search text (not evaluation)
GE="python -m gatenorm_edge"
mkdir -p "$OUT"
WIKI_CALIB=$OUT/wiki-tail-calib.txt
[[ -f $WIKI_CALIB ]] || { tail -n +3958 "$WIKI" > "$WIKI_CALIB.$$" && mv "$WIKI_CALIB.$$" "$WIKI_CALIB"; }
name=$(basename "$MODEL" .gguf)
prune() {  # prune K MODE
  local plan=(--plan "$OUT/$name-scores.json" --count "$1" --force) out=(--json "$OUT/k$1-$2.prune.json")
  case $2 in
    drop) $GE prune "$MODEL" "$OUT/k$1-$2.gguf" "${plan[@]}" --mode drop "${out[@]}" ;;
    fold-vo) $GE prune "$MODEL" "$OUT/k$1-$2.gguf" "${plan[@]}" --mode fold-vo "${out[@]}" ;;
    fold-vo-search) $GE prune "$MODEL" "$OUT/k$1-$2.gguf" "${plan[@]}" --mode fold-vo --alpha-search "$CALIB" "${out[@]}" ;;
    linear) $GE prune "$MODEL" "$OUT/k$1-$2.gguf" "${plan[@]}" --mode linear --calib "$CALIB" \
      --calib-tokens 2048 --calib-ctx 512 "${out[@]}" ;;
    linear-wiki) $GE prune "$MODEL" "$OUT/k$1-$2.gguf" "${plan[@]}" --mode linear --calib "$WIKI_CALIB" \
      --calib-tokens 2048 --calib-ctx 512 "${out[@]}" ;;
    *) echo "unknown mode $2" >&2; exit 2 ;;
  esac
}
if has prune; then
  $GE score "$MODEL" --json "$OUT/$name-scores.json" > /dev/null
  for k in $KS; do for mode in $MODES; do prune "$k" "$mode"; done; done
fi
has ppl && [[ ! -f $OUT/base.ppl.json ]] && $GE ppl "$MODEL" --text "$WIKI" --ctx 512 --chunks "$CHUNKS" --json "$OUT/base.ppl.json"
has ppl && for k in $KS; do
  for mode in $MODES; do
    $GE ppl "$OUT/k$k-$mode.gguf" --text "$WIKI" --ctx 512 --chunks "$CHUNKS" --json "$OUT/k$k-$mode.ppl.json"
  done
done
has bench && for k in $KS; do
  for mode in $MODES; do
    [[ $mode == fold-vo-search || $mode == linear-wiki ]] && continue  # same compute as fold-vo / linear
    $GE bench "$MODEL" --vs "$OUT/k$k-$mode.gguf" --prompt 128 --gen 32 --depth 0 --reps "${BENCH_REPS:-3}" \
      ${BENCH_THREADS:+--threads "$BENCH_THREADS"} --json "$OUT/k$k-$mode.bench.json"
  done
done
exit 0
