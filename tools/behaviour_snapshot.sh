#!/usr/bin/env bash
# Behaviour snapshot for refactors: run a fixed set of explicit commands with the code in TREE, keep the
# sha256 of every GGUF written (18 commands) and every JSON with timings, paths and throughput removed. Two snapshots of
# the same commands must be identical (`diff -r A B`): byte-identical GGUF files, the same JSON.
#
#   tools/behaviour_snapshot.sh OUT [TREE]      # TREE defaults to this checkout; models from ../shared and the cache
set -euo pipefail
OUT=$(realpath -m "$1"); TREE=$(realpath "${2:-$(dirname "$0")/..}")
rm -rf "$OUT"; mkdir -p "$OUT"
export PYTHONPATH=$TREE GATENORM_CACHE=$OUT/.cache
G="python3 -m gatenorm_edge"
SHARED=$(realpath "$TREE/../shared")
MODELS=${GATENORM_MODELS:-$HOME/.cache/gatenorm-edge/models}
S=$SHARED/models/stories260K.gguf
M=$SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf
Q=$MODELS/qwen2.5-coder-0.5b-instruct-q4.gguf
E=$MODELS/gemma-3-270m-q4_k_m.gguf
T=$SHARED/data/tinystories/tinystories_val_subset.txt
cd "$TREE"
quiet() { "$@" >/dev/null 2>&1 || { echo "failed: $*" >&2; exit 1; }; }
quiet $G prune $S $OUT/s-layers.gguf --layers 2,3 --json $OUT/s-layers.json
quiet $G prune $M $OUT/m-layers.gguf --layers 5,9 --json $OUT/m-layers.json
quiet $G prune $Q $OUT/q-layers.gguf --layers 3,7 --json $OUT/q-layers.json
quiet $G prune $M $OUT/m-old.gguf --count 4 --criterion per-head --mode drop --json $OUT/m-old.json
quiet $G prune $S $OUT/s-default.gguf --count 2 --json $OUT/s-default.json
quiet $G prune $S $OUT/s-default-calib.gguf --count 2 --calib $T --json $OUT/s-default-calib.json
quiet $G prune $M $OUT/m-fold.gguf --layers 26,27 --mode fold-vo --json $OUT/m-fold.json
quiet $G prune $S $OUT/s-linear.gguf --layers 2 --mode linear --calib $T --json $OUT/s-linear.json
quiet $G score $M --json $OUT/m-score.json
quiet $G score $Q --variant full --json $OUT/q-score.json
quiet $G score $E --json $OUT/e-score.json
quiet $G inspect $OUT/m-old.gguf --json $OUT/m-old-inspect.json
quiet $G inspect $Q --json $OUT/q-inspect.json
quiet $G ppl $S --text $T --ctx 128 --chunks 4 --json $OUT/s-ppl.json
quiet $G ppl $OUT/m-layers.gguf --text $T --ctx 128 --chunks 3 --json $OUT/m-ppl.json
quiet $G study $S --text $T --counts 1,2 --ctx 128 --chunks 2 --calib-ctx 128 --calib-chunks 2 --threads 1 --json $OUT/s-study.json
quiet $G zeroshot $M --tasks arc_easy,piqa --limit 5 --cache-dir $OUT/.zeroshot --json $OUT/m-zs.json
quiet $G compare $S $OUT/s-layers.gguf --text $T --ctx 128 --chunks 3 --no-speed --json $OUT/s-compare.json
cd "$OUT" && sha256sum ./*.gguf > gguf.sha256 && rm -f ./*.gguf && rm -rf .cache .zeroshot
python3 - "$OUT" <<'PY'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
TIMING = re.compile(r"seconds|_s$|time|rss|per_s|tokens_per|t_s|speed|ratio|load|wall|bench|elapsed|tg|pp", re.I)
def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items() if not TIMING.search(k)}
    return [clean(v) for v in x] if isinstance(x, list) else x
for path in sorted(out.glob("*.json")):
    text = json.dumps(clean(json.loads(path.read_text())), indent=1, sort_keys=True).replace(str(out), "OUT")
    path.write_text(text + "\n")
PY
echo "snapshot in $OUT"
