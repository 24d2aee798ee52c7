"""Pairs of GGUF files benchmarked one pair per run, as `bench A --vs B` does (interleaved A B A B, fresh
worker processes per run), at one depth: how far two runs of the same file disagree, which bounds any
prediction. `docs/budget/pp-reproducibility.json` was written by

    python tools/speed_pairs.py docs/budget/pp-reproducibility.json \\
        BASE:BASE BASE:DECI0 DECI0:K4 DECI0:K11 BASE:BASE

with BASE the SmolLM2 GGUF, DECI0 the same model rewritten to deci with no layer removed
(`rewrite.prune_gguf(BASE, DECI0, [])`) and K4/K11 `tools/budget_study.py`'s files.

Usage: python tools/speed_pairs.py OUT.json A:B [A:B ...] [--depth 4096] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gatenorm_edge.fileio import write_text_atomic
from gatenorm_edge.harness.speed import KINDS, BenchSettings, bench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("pairs", nargs="+")
    parser.add_argument("--depth", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    settings = BenchSettings(prompt=256, gen=32, depths=(args.depth,), reps=args.reps)
    results = []
    for pair in args.pairs:
        first, second = pair.split(":")
        result = bench([Path(first), Path(second)], settings)
        medians = {kind: [result.tps(kind)[label][str(args.depth)].median for label in result.models] for kind in KINDS}
        results.append({"pair": [first, second], "ratios": {kind: result.ratios[kind][str(args.depth)] for kind in KINDS},
                        "median_tps": medians})
        print(pair, {kind: round(result.ratios[kind][str(args.depth)], 3) for kind in KINDS}, flush=True)
    write_text_atomic(args.out, json.dumps({"depth": args.depth, "reps": args.reps, "flash_attn": True,
                                            "prompt": 256, "gen": 32, "pairs": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
