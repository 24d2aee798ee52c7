"""Issue 15's check of the speed model: predicted vs measured pp/tg speedup, interleaved A B A B.

For each model, the speed model is measured at the depths (cached per CPU), then for each K and mode
(drop; patch: the same layers as zero linear patches, which cost what any patch costs) a pruned file is
benchmarked against the base as `bench --vs --processes` does, interleaved A B A B, at the same depths,
in ``VALIDATION.processes`` fresh pairs of worker processes of ``VALIDATION.reps`` rounds each; each
measured ratio is the median of all their per-round ratios. The goal: every prediction within 5% of the
measurement. (pp at depth settles at a speed that differs from one worker process to the next, by up to
16% on one host: docs/budget.md; a single pair of processes cannot check a prediction to 5%.) Each pair's
measurement is kept in ``bench/out/speedmodel-pairs/`` with its settings, so a stopped run resumes.

Environment: GATENORM_BENCH_MODELS (default smollm2,qwen05), GATENORM_BENCH_DEPTHS (0,4096,8192),
GATENORM_BENCH_COUNTS (4,8,12), GATENORM_BENCH_COST_MODELS (smollm2,qwen15: the speed model's cost
from nothing at depth 4096, `prune --speedup`'s default; empty: not measured). A depth beyond what the model's training
context holds with the timed prompt after it is cut to the deepest that fits (SmolLM2: 7936 for 8192).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gatenorm_edge.fetch import fetch_model
from gatenorm_edge.fileio import write_text_atomic
from gatenorm_edge.harness.speed import BenchSettings, bench
from gatenorm_edge.rewrite import prune_gguf
from gatenorm_edge.scoring import score_model
from gatenorm_edge.sources.geometry import gguf_geometry
from gatenorm_edge.speedmodel import SPEED_SETTINGS, Change, cpu_name, measure_speed_model, speed_settings


def _ints(name: str, default: str) -> tuple[int, ...]:
    return tuple(int(part) for part in os.environ.get(name, default).split(","))


VALIDATION = {"reps": 1, "processes": 5}
PAIRS = Path(__file__).resolve().parent / "out" / "speedmodel-pairs"


def cost(names: list[str], depth: int = 4096) -> dict[str, float]:
    """Seconds to measure each model's speed model from nothing at one depth, as `prune --speedup X` does on
    its first run (into a fresh cache)."""
    seconds = {}
    for name in filter(None, names):
        path = fetch_model(name)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            measure_speed_model(path, speed_settings(path, (depth,)), cache_dir=Path(tmp))
            seconds[name] = round(time.perf_counter() - started, 1)
        print(f"{name}: speed model at depth {depth} in {seconds[name]} s", file=sys.stderr, flush=True)
    return seconds


def pair_ratios(base: Path, layers: list[int], mode: str, settings: BenchSettings, cache: Path,
                progress: bool) -> dict[str, dict[str, float]]:
    """`bench --vs` of ``base`` against it with ``layers`` dropped or zero-patched: the measured ratios, kept
    in ``cache`` (reused only when measured with the same settings and layers)."""
    key = json.loads(json.dumps({"settings": dataclasses.asdict(settings), "layers": list(layers), "mode": mode}))
    if cache.is_file() and (kept := json.loads(cache.read_text()))["key"] == key:
        return kept["ratios"]
    with tempfile.TemporaryDirectory() as tmp:
        pruned = Path(tmp) / "pruned.gguf"
        width = gguf_geometry(base).n_embd
        maps = (lambda layer: np.zeros((width, width), dtype=np.float32)) if mode == "patch" else None
        prune_gguf(base, pruned, layers, linear_maps=maps)
        measured = bench([base, pruned], settings, progress=progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache, json.dumps({"key": key, "ratios": measured.ratios, "result": measured.to_dict()}, indent=1) + "\n")
    return measured.ratios


def run() -> dict:
    models = os.environ.get("GATENORM_BENCH_MODELS", "smollm2,qwen05").split(",")
    depths, counts = _ints("GATENORM_BENCH_DEPTHS", "0,4096,8192"), _ints("GATENORM_BENCH_COUNTS", "4,8,12")
    rows, costs, progress = [], {}, sys.stderr.isatty()
    for name in models:
        base = fetch_model(name)
        settings = speed_settings(base, depths)
        speed = measure_speed_model(base, settings, progress=progress)
        costs[name] = round(speed.seconds, 1)
        order = score_model(base, "per-head").prune_order
        check = dataclasses.replace(settings, **VALIDATION)
        for k in counts:
            for mode in ("drop", "patch"):
                ratios = pair_ratios(base, order[:k], mode, check, PAIRS / f"{name}-k{k}-{mode}.json", progress)
                change = Change(dropped=tuple(order[:k])) if mode == "drop" else Change(patched=tuple(order[:k]))
                for kind in ("pp", "tg"):
                    for depth in settings.depths:
                        want, got = speed.speedup(kind, depth, change), ratios[kind][str(depth)]
                        rows.append({"model": name, "k": k, "mode": mode, "kind": kind, "depth": depth,
                                     "predicted": round(want, 4), "measured": round(got, 4),
                                     "error_pct": round(100 * (want / got - 1), 2)})
                        print(f"{name} k={k} {mode} {kind} d{depth}: predicted {want:.3f} measured {got:.3f}",
                              file=sys.stderr, flush=True)
    worst = max(abs(row["error_pct"]) for row in rows)
    return {"rows": rows, "worst_error_pct": worst, "goal_pct": 5.0, "met": worst <= 5.0,
            "speed_model_seconds": costs, "cpu": cpu_name(),
            "cost_at_4096_seconds": cost(os.environ.get("GATENORM_BENCH_COST_MODELS", "smollm2,qwen15").split(",")),
            "settings": {"prompt": SPEED_SETTINGS.prompt, "gen": SPEED_SETTINGS.gen, "reps": SPEED_SETTINGS.reps,
                         "validation_reps": VALIDATION["reps"], "validation_processes": VALIDATION["processes"],
                         "flash_attn": SPEED_SETTINGS.flash_attn}}
