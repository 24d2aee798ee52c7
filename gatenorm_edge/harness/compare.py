"""Before vs after: perplexity of both models, KL divergence, top-1 agreement, speed ratios, sizes, KV bytes."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..inspection import AttentionCost, attention_cost, cost_dict
from ..options import DEFAULT_CACHE_TYPE
from ..sources import GGUFFile
from .kld import DivergenceResult, kl_divergence
from .passkey import PasskeyResult, passkey
from .speed import BenchResult, BenchSettings, bench

if TYPE_CHECKING:
    from .zeroshot.report import ZeroShotRow

KLD_KEYS = ("tokens", "kld_mean", "kld_stderr", "kld_median", "kld_p99", "kld_max", "top1_agreement")


@dataclass(frozen=True)
class LongContext:
    """Both models at one long context: PPL and KLD on the text, and pass-key retrieval."""

    ctx: int
    divergence: DivergenceResult
    base_passkey: PasskeyResult
    pruned_passkey: PasskeyResult

    def to_dict(self) -> dict[str, Any]:
        d = self.divergence
        return {
            "ctx": self.ctx, "perplexity": {"base": d.base.to_dict(), "pruned": d.other.to_dict()},
            "kld": {key: getattr(d, key) for key in KLD_KEYS},
            "passkey": {"base": self.base_passkey.to_dict(), "pruned": self.pruned_passkey.to_dict()},
        }


@dataclass
class CompareResult:
    """Everything ``compare`` measured; ``to_dict`` is the ``compare --json`` contract."""

    base: str
    pruned: str
    text: str
    text_label: str
    flash_attn: bool
    file_bytes: dict[str, int]
    base_cost: AttentionCost | None
    pruned_cost: AttentionCost | None
    divergence: DivergenceResult
    speed: BenchResult | None
    seconds: float
    zeroshot: list[ZeroShotRow] | None = None
    long_context: list[LongContext] | None = None
    cache_type: str = DEFAULT_CACHE_TYPE

    def to_dict(self) -> dict[str, Any]:
        d = self.divergence
        data = {
            "base": self.base, "pruned": self.pruned, "text": self.text, "text_label": self.text_label,
            "flash_attn": self.flash_attn, "cache_type": self.cache_type, "file_bytes": self.file_bytes,
            "attention_cost": {"base": cost_dict(self.base_cost), "pruned": cost_dict(self.pruned_cost)},
            "perplexity": {"base": d.base.to_dict(), "pruned": d.other.to_dict()},
            "kld": {key: getattr(d, key) for key in KLD_KEYS},
            "speed": self.speed.to_dict() if self.speed is not None else None,
            "seconds": self.seconds,
        }
        if self.long_context is not None:
            data["long_context"] = [entry.to_dict() for entry in self.long_context]
        return data if self.zeroshot is None else data | {"zeroshot": [asdict(row) for row in self.zeroshot]}


def compare(
    base: Path | str,
    pruned: Path | str,
    text: Path | str,
    *,
    ctx: int = 512,
    chunks: int | None = None,
    flash_attn: bool = True,
    n_threads: int | None = None,
    cache_type: str = DEFAULT_CACHE_TYPE,
    speed: BenchSettings | None = BenchSettings(),
    text_label: str | None = None,
    progress: bool = False,
) -> CompareResult:
    """Both models on the same text (and, unless ``speed`` is None, benchmarked interleaved).

    ``flash_attn``, ``cache_type`` and ``n_threads`` apply to the perplexity pass and the benchmark alike.
    """
    started = time.perf_counter()
    divergence = kl_divergence(
        base, pruned, text, ctx=ctx, chunks=chunks, progress=progress, flash_attn=flash_attn, n_threads=n_threads,
        cache_type=cache_type,
    )
    speed_result = None
    if speed is not None:
        settings = dataclasses.replace(speed, flash_attn=flash_attn, threads=n_threads or speed.threads, cache_type=cache_type)
        speed_result = bench([base, pruned], settings, progress=progress)
    return CompareResult(
        base=str(base),
        pruned=str(pruned),
        text=str(text),
        text_label=text_label or Path(text).name,
        flash_attn=flash_attn,
        cache_type=cache_type,
        file_bytes={"base": GGUFFile(base).nbytes, "pruned": GGUFFile(pruned).nbytes},
        base_cost=attention_cost(base),
        pruned_cost=attention_cost(pruned),
        divergence=divergence,
        speed=speed_result,
        seconds=time.perf_counter() - started,
    )


def long_context(
    base: Path | str,
    pruned: Path | str,
    text: Path | str,
    contexts: Sequence[int],
    *,
    chunks: int = 4,
    trials: int = 10,
    flash_attn: bool = True,
    n_threads: int | None = None,
    cache_type: str = DEFAULT_CACHE_TYPE,
    progress: bool = False,
) -> list[LongContext]:
    """What short tests miss: PPL and KLD at each long context, and pass-key retrieval there, for both models."""
    rows = []
    for ctx in contexts:
        divergence = kl_divergence(
            base, pruned, text, ctx=ctx, chunks=chunks, progress=progress, flash_attn=flash_attn, n_threads=n_threads,
            cache_type=cache_type,
        )
        keys = [passkey(path, ctx, trials, flash_attn=flash_attn, n_threads=n_threads, cache_type=cache_type,
                        progress=progress) for path in (base, pruned)]
        rows.append(LongContext(ctx, divergence, *keys))
    return rows
