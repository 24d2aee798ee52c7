"""Run every benchmark (or those named on the command line) and write one JSON file each to bench/out/."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

BENCHMARKS = ("score", "rewrite", "speed", "zeroshot", "recovery", "fuzz", "speedmodel")
OUT = Path(__file__).resolve().parent / "out"


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    for name in names or BENCHMARKS:
        started = time.perf_counter()
        print(f"== bench {name}", file=sys.stderr, flush=True)
        result = importlib.import_module(f"bench.{name}").run()
        result.setdefault("bench_seconds", round(time.perf_counter() - started, 2))
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"== wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
