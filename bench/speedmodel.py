"""Issue 15's check of the speed model: predicted vs measured pp/tg speedup, interleaved A B A B.

For each model, the speed model is measured at the depths (cached per CPU), then for each K and mode
(drop; patch: the same layers as zero linear patches, which cost what any patch costs) a pruned file is
benchmarked against the base, interleaved, at the same depths; each measured ratio is the median of
per-pair ratios. The goal: every prediction within 5% of the measurement.

Environment: GATENORM_BENCH_MODELS (default smollm2,qwen05), GATENORM_BENCH_DEPTHS (0,4096,8192),
GATENORM_BENCH_COUNTS (4,8,12).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from gatenorm_edge.fetch import fetch_model
from gatenorm_edge.harness.speed import BenchSettings, bench
from gatenorm_edge.rewrite import prune_gguf
from gatenorm_edge.scoring import score_model
from gatenorm_edge.sources.geometry import gguf_geometry
from gatenorm_edge.speedmodel import measure_speed_model


def _ints(name: str, default: str) -> tuple[int, ...]:
    return tuple(int(part) for part in os.environ.get(name, default).split(","))


def run() -> dict:
    models = os.environ.get("GATENORM_BENCH_MODELS", "smollm2,qwen05").split(",")
    depths, counts = _ints("GATENORM_BENCH_DEPTHS", "0,4096,8192"), _ints("GATENORM_BENCH_COUNTS", "4,8,12")
    settings = BenchSettings(prompt=256, gen=32, depths=depths, reps=3)
    rows, progress = [], sys.stderr.isatty()
    for name in models:
        base = fetch_model(name)
        speed = measure_speed_model(base, settings, progress=progress)
        order = score_model(base, "per-head").prune_order
        width = gguf_geometry(base).n_embd
        for k in counts:
            for mode in ("drop", "patch"):
                with tempfile.TemporaryDirectory() as tmp:
                    pruned = Path(tmp) / f"k{k}-{mode}.gguf"
                    maps = (lambda layer: np.zeros((width, width), dtype=np.float32)) if mode == "patch" else None
                    prune_gguf(base, pruned, order[:k], linear_maps=maps)
                    measured = bench([base, pruned], settings, progress=progress)
                dropped, patched = (k, 0) if mode == "drop" else (0, k)
                for kind in ("pp", "tg"):
                    for depth in depths:
                        want = speed.speedup(kind, depth, dropped, patched)
                        got = measured.ratios[kind][str(depth)]
                        rows.append({"model": name, "k": k, "mode": mode, "kind": kind, "depth": depth,
                                     "predicted": round(want, 4), "measured": round(got, 4),
                                     "error_pct": round(100 * (want / got - 1), 2)})
                        print(f"{name} k={k} {mode} {kind} d{depth}: predicted {want:.3f} measured {got:.3f}",
                              file=sys.stderr, flush=True)
    worst = max(abs(row["error_pct"]) for row in rows)
    return {"rows": rows, "worst_error_pct": worst, "goal_pct": 5.0, "met": worst <= 5.0,
            "settings": {"prompt": settings.prompt, "gen": settings.gen, "reps": settings.reps, "flash_attn": True}}
