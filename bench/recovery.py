"""Benchmark: what recovery adds to a prune on SmolLM2 — fold-vo rewrite time over drop (interleaved,
medians) and the least-squares fit's time per calibration token (one run, 512 tokens, 2 layers)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from gatenorm_edge.recovery import fit_linear_maps, fold_vo_maps
from gatenorm_edge.reference import ReferenceModel
from gatenorm_edge.rewrite import prune_gguf

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS = [26, 27, 28, 29]
ROUNDS = 3
CALIB_TOKENS, CALIB_CTX = 512, 256


def _timed(fn: object, *args: object, **kwargs: object) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)  # type: ignore[operator]
    return time.perf_counter() - started


def run() -> dict:
    if not MODEL.is_file():
        return {"skipped": f"{MODEL} not found"}
    drop, fold = [], []
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "out.gguf"
        for _ in range(ROUNDS):
            drop.append(_timed(prune_gguf, MODEL, out, LAYERS, force=True))
            fold.append(_timed(prune_gguf, MODEL, out, LAYERS, force=True, linear_maps=fold_vo_maps(MODEL, 1.0)))
    reference = ReferenceModel.from_gguf(MODEL)
    sequences = [list(range(1, CALIB_CTX + 1))] * (CALIB_TOKENS // CALIB_CTX)
    fit_seconds = _timed(fit_linear_maps, reference, LAYERS[-2:], sequences)
    return {
        "model": MODEL.name,
        "layers": LAYERS,
        "drop_rewrite_seconds_median": statistics.median(drop),
        "fold_vo_rewrite_seconds_median": statistics.median(fold),
        "fold_vo_over_drop": statistics.median(f / d for f, d in zip(fold, drop)),
        "linear_fit_layers": LAYERS[-2:],
        "linear_fit_tokens": CALIB_TOKENS,
        "linear_fit_seconds": fit_seconds,
        "linear_fit_ms_per_token": 1000 * fit_seconds / CALIB_TOKENS,
    }
