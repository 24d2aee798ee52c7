"""The speed model's check: predicted vs measured pp/tg speedup, interleaved A B A B.

For each model and KV-cache type, the speed model is measured at the depths (cached per CPU), then for each K and
mode (drop; patch: the same layers as zero linear patches, which cost what any patch costs; window: the same
layers windowed to ``WINDOW`` tokens) a changed file is benchmarked against the base with llama.cpp's default F16
cache, itself run with the cache type, as `bench --vs --vs-cache-type --processes` does, interleaved A B A B, at
the same depths, in ``VALIDATION.processes`` fresh pairs of worker processes of ``VALIDATION.reps`` rounds each;
each measured ratio is the median of all their per-round ratios. The goal: every prediction within 5% of the
measurement. (pp at depth settles at a speed that differs from one worker process to the next, by up to
16% on one host: docs/budget.md; a single pair of processes cannot check a prediction to 5%.) tg at the deepest
depth is measured a second time by llama.cpp's own llama-bench (``harness/llama_bench.py``: built from the vendored
llama.cpp, one fresh process per round and model, A B A B), the median of its per-round ratios beside the
others. Each pair's measurement is kept in ``bench/out/speedmodel-pairs/`` with its settings, so a stopped run
resumes.

Environment: GATENORM_BENCH_MODELS (default smollm2,qwen05), GATENORM_BENCH_DEPTHS (0,4096,8192),
GATENORM_BENCH_COUNTS (4,8,12), GATENORM_BENCH_MODES (drop,patch,window), GATENORM_BENCH_CACHES (f16,q8_0),
GATENORM_BENCH_LLAMA_BENCH (rounds of llama-bench per cell, default 3; 0: none), GATENORM_BENCH_COST_MODELS
(smollm2,qwen15: the speed model's cost from nothing at depth 4096, `prune --speedup`'s default; empty: not
measured). A depth beyond what the model's training context holds with the timed prompt after it is cut to the
deepest that fits (SmolLM2: 7936 for 8192).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from gatenorm_edge.fetch import fetch_model
from gatenorm_edge.harness.llama_bench import interleaved
from gatenorm_edge.fileio import write_text_atomic
from gatenorm_edge.harness.speed import BenchSettings, bench, paired_ratio
from gatenorm_edge.rewrite import prune_gguf, window_gguf
from gatenorm_edge.scoring import score_model
from gatenorm_edge.sources.geometry import gguf_geometry
from gatenorm_edge.speedmodel import SPEED_SETTINGS, Change, cpu_name, measure_speed_model, speed_settings


def _ints(name: str, default: str) -> tuple[int, ...]:
    return tuple(int(part) for part in os.environ.get(name, default).split(","))


VALIDATION = {"reps": 1, "processes": 5}
WINDOW = 512
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


def changed_file(base: Path, layers: list[int], mode: str, folder: Path) -> Path:
    """``base`` with ``layers`` dropped, zero-patched or windowed to ``WINDOW`` tokens."""
    path = folder / f"{mode}.gguf"
    if mode == "window":
        window_gguf(base, path, layers, WINDOW)
        return path
    width = gguf_geometry(base).n_embd
    maps = (lambda layer: np.zeros((width, width), dtype=np.float32)) if mode == "patch" else None
    prune_gguf(base, path, layers, linear_maps=maps)
    return path


def pair_ratios(base: Path, layers: list[int], mode: str, cache_type: str, settings: BenchSettings, cache: Path,
                llama_rounds: int, progress: bool) -> dict[str, Any]:
    """`bench --vs` of ``base`` (F16 cache) against it with ``layers`` changed (``cache_type``): the measured
    ratios, and llama-bench's tg ratio at the deepest depth; kept in ``cache`` (reused only when measured with
    the same settings, layers, mode, cache type and llama-bench rounds)."""
    key = json.loads(json.dumps({"settings": dataclasses.asdict(settings), "layers": list(layers), "mode": mode,
                                 "cache_type": cache_type, "llama_rounds": llama_rounds}))
    if cache.is_file() and (kept := json.loads(cache.read_text()))["key"] == key:
        return kept
    with tempfile.TemporaryDirectory() as tmp:
        changed = changed_file(base, layers, mode, Path(tmp))
        measured = bench([base, changed], settings, progress=progress, cache_types=["f16", cache_type])
        deepest = max(settings.depths)
        llama = None
        if llama_rounds:
            rates = interleaved([(base, "f16"), (changed, cache_type)], deepest, settings.gen, llama_rounds,
                                measured.threads)
            llama = paired_ratio(rates[1], rates[0])
    kept = {"key": key, "ratios": measured.ratios, "llama_bench_tg": llama, "result": measured.to_dict()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cache, json.dumps(kept, indent=1) + "\n")
    return kept


def run() -> dict:
    models = os.environ.get("GATENORM_BENCH_MODELS", "smollm2,qwen05").split(",")
    depths, counts = _ints("GATENORM_BENCH_DEPTHS", "0,4096,8192"), _ints("GATENORM_BENCH_COUNTS", "4,8,12")
    modes = os.environ.get("GATENORM_BENCH_MODES", "drop,patch,window").split(",")
    caches = os.environ.get("GATENORM_BENCH_CACHES", "f16,q8_0").split(",")
    llama_rounds = int(os.environ.get("GATENORM_BENCH_LLAMA_BENCH", "3"))
    rows, costs, progress = [], {}, sys.stderr.isatty()
    for name in models:
        base = fetch_model(name)
        order = score_model(base, "per-head").prune_order
        for cache_type in caches:
            settings = dataclasses.replace(speed_settings(base, depths), cache_type=cache_type)
            speed = measure_speed_model(base, settings, window=WINDOW if "window" in modes else None, progress=progress)
            costs[f"{name} {cache_type}"] = round(speed.seconds, 1)
            check = dataclasses.replace(settings, cache_type="f16", **VALIDATION)
            for k in counts:
                for mode in modes:
                    pair = pair_ratios(base, order[:k], mode, cache_type, check,
                                       PAIRS / f"{name}-k{k}-{mode}-{cache_type}.json", llama_rounds, progress)
                    layers = tuple(order[:k])
                    change = Change(**{"drop": {"dropped": layers}, "patch": {"patched": layers},
                                       "window": {"windowed": layers, "window": WINDOW}}[mode], cache_type=cache_type)
                    for kind in ("pp", "tg"):
                        for depth in settings.depths:
                            want, got = speed.speedup(kind, depth, change), pair["ratios"][kind][str(depth)]
                            row = {"model": name, "k": k, "mode": mode, "cache_type": cache_type, "kind": kind,
                                   "depth": depth, "predicted": round(want, 4), "measured": round(got, 4),
                                   "error_pct": round(100 * (want / got - 1), 2)}
                            if kind == "tg" and depth == max(settings.depths) and pair["llama_bench_tg"]:
                                row["llama_bench"] = round(pair["llama_bench_tg"], 4)
                                row["llama_bench_error_pct"] = round(100 * (want / pair["llama_bench_tg"] - 1), 2)
                            rows.append(row)
                            print(f"{name} {cache_type} k={k} {mode} {kind} d{depth}: predicted {want:.3f} measured "
                                  f"{got:.3f}" + (f" llama-bench {row['llama_bench']:.3f}" if "llama_bench" in row else ""),
                                  file=sys.stderr, flush=True)
    worst = max(abs(row["error_pct"]) for row in rows)
    return {"rows": rows, "worst_error_pct": worst, "goal_pct": 5.0, "met": worst <= 5.0,
            "speed_model_seconds": costs, "cpu": cpu_name(), "window": WINDOW,
            "cost_at_4096_seconds": cost(os.environ.get("GATENORM_BENCH_COST_MODELS", "smollm2,qwen15").split(",")),
            "settings": {"prompt": SPEED_SETTINGS.prompt, "gen": SPEED_SETTINGS.gen, "reps": SPEED_SETTINGS.reps,
                         "validation_reps": VALIDATION["reps"], "validation_processes": VALIDATION["processes"],
                         "llama_bench_rounds": llama_rounds, "flash_attn": SPEED_SETTINGS.flash_attn}}
