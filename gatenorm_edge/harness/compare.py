"""Before vs after: perplexity of both models, KL divergence, top-1 agreement, speed ratios, sizes, KV bytes."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ..inspection import attention_cost
from ..sources import GGUFFile
from .kld import kl_divergence
from .speed import BenchSettings, bench


def compare(
    base: Path | str,
    pruned: Path | str,
    text: Path | str,
    *,
    ctx: int = 512,
    chunks: int | None = None,
    flash_attn: bool = True,
    n_threads: int | None = None,
    speed: BenchSettings | None = BenchSettings(),
    text_label: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Everything ``compare`` reports, as one JSON-ready dict (``speed`` None skips the benchmark).

    ``flash_attn`` and ``n_threads`` apply to the perplexity pass and the benchmark alike.
    """
    started = time.perf_counter()
    divergence = kl_divergence(
        base, pruned, text, ctx=ctx, chunks=chunks, progress=progress, flash_attn=flash_attn, n_threads=n_threads
    )
    speed_result = None
    if speed is not None:
        settings = dataclasses.replace(speed, flash_attn=flash_attn, threads=n_threads or speed.threads)
        speed_result = bench([base, pruned], settings, progress=progress)
    return {
        "base": str(base),
        "pruned": str(pruned),
        "text": str(text),
        "text_label": text_label or Path(text).name,
        "flash_attn": flash_attn,
        "file_bytes": {"base": GGUFFile(base).nbytes, "pruned": GGUFFile(pruned).nbytes},
        "attention_cost": {"base": attention_cost(base), "pruned": attention_cost(pruned)},
        "perplexity": {"base": divergence.base.to_dict(), "pruned": divergence.other.to_dict()},
        "kld": {
            key: getattr(divergence, key)
            for key in ("tokens", "kld_mean", "kld_stderr", "kld_median", "kld_p99", "kld_max", "top1_agreement")
        },
        "speed": speed_result,
        "seconds": time.perf_counter() - started,
    }
