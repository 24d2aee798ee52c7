"""KL divergence of a changed model's next-token distributions from the base model's, chunk by chunk.

Same chunks and scored positions as ``perplexity`` (llama-perplexity's method); for every scored
position KL(P_base || P_changed) = sum_v p_base(v) * (log p_base(v) - log p_changed(v)), and whether both
models rank the same token first. Reported like ``llama-perplexity --kl-divergence``: mean KLD with its
standard error, median, 99th percentile (linear interpolation between order statistics), maximum, and
"same top p". Unlike llama-perplexity, which stores the base log-probabilities quantized to 16 bits and
drops terms with p_base < e^-16, this computes every term exactly in float64 from both models' logits,
which are streamed: one chunk's logits per model are held at a time, only per-token KLD values are kept.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .logprobs import log_softmax, row_blocks, stderr_of_mean
from ..options import DEFAULT_CACHE_TYPE
from .perplexity import NllStats, PerplexityResult, chunk_logits, models_on_text
from ..progress import progress_bar


@dataclass
class TokenDivergence:
    """Per-position KLD, NLLs and top-1 agreement of one chunk."""

    kld: np.ndarray
    nll_base: np.ndarray
    nll_other: np.ndarray
    same_top: np.ndarray


def token_divergence(base_logits: np.ndarray, other_logits: np.ndarray, targets: np.ndarray) -> TokenDivergence:
    """KL(base || other) per row, both NLLs of the targets, and whether the arg-max tokens agree."""
    n_rows = len(targets)
    result = TokenDivergence(np.empty(n_rows), np.empty(n_rows), np.empty(n_rows), np.empty(n_rows, dtype=bool))
    for rows in row_blocks(n_rows):
        log_p = log_softmax(base_logits[rows])
        log_q = log_softmax(other_logits[rows])
        picked = np.arange(log_p.shape[0]), targets[rows]
        result.kld[rows] = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
        result.nll_base[rows] = -log_p[picked]
        result.nll_other[rows] = -log_q[picked]
        result.same_top[rows] = log_p.argmax(axis=-1) == log_q.argmax(axis=-1)
    return result


@dataclass
class DivergenceTotals:
    """Chunk-by-chunk sums: both models' NLLs, every scored position's KLD, and top-1 agreements."""

    base: NllStats = field(default_factory=NllStats)
    other: NllStats = field(default_factory=NllStats)
    kld_chunks: list[np.ndarray] = field(default_factory=list)
    same_top: int = 0
    kld_sum: float = 0.0

    def add(self, chunk: TokenDivergence) -> None:
        self.base.add(chunk.nll_base)
        self.other.add(chunk.nll_other)
        self.kld_chunks.append(chunk.kld)
        self.same_top += int(chunk.same_top.sum())
        self.kld_sum += float(chunk.kld.sum())

    @property
    def running_kld(self) -> float:
        return self.kld_sum / self.other.count

    def kld(self) -> np.ndarray:
        return np.concatenate(self.kld_chunks)

    @property
    def top1_agreement(self) -> float:
        return self.same_top / self.other.count


@dataclass
class DivergenceResult:
    """Both perplexities and the divergence statistics; ``to_dict`` for JSON."""

    base: PerplexityResult
    other: PerplexityResult
    tokens: int
    kld_mean: float
    kld_stderr: float | None
    kld_median: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def kl_divergence(
    base_path: Path | str,
    other_path: Path | str,
    text: Path | str,
    ctx: int = 512,
    chunks: int | None = None,
    progress: bool = False,
    *,
    flash_attn: bool = True,
    n_threads: int | None = None,
    cache_type: str = DEFAULT_CACHE_TYPE,
) -> DivergenceResult:
    """Evaluate both models on the same chunks of ``text``: PPL of each, KLD of ``other`` from ``base``."""
    started = time.perf_counter()
    paths = [base_path, other_path]
    with models_on_text(paths, text, ctx, chunks, flash_attn, n_threads, cache_type) as ([base, other], tokens, n_chunks):
        totals = DivergenceTotals()
        with progress_bar(f"KLD {Path(other_path).name}", n_chunks, progress) as tick:
            for index in range(n_chunks):
                base_logits, targets = chunk_logits(base, tokens, index, ctx)
                other_logits, _ = chunk_logits(other, tokens, index, ctx)
                totals.add(token_divergence(base_logits, other_logits, targets))
                tick(status=f"PPL {totals.base.ppl:.3f} -> {totals.other.ppl:.3f}, KLD {totals.running_kld:.4f}")
    kld = totals.kld()
    seconds = time.perf_counter() - started

    return DivergenceResult(
        base=PerplexityResult.from_stats(base_path, text, ctx, n_chunks, totals.base, seconds, flash_attn, cache_type),
        other=PerplexityResult.from_stats(other_path, text, ctx, n_chunks, totals.other, seconds, flash_attn, cache_type),
        tokens=int(kld.size),
        kld_mean=float(kld.mean()),
        kld_stderr=stderr_of_mean(kld),
        kld_median=float(np.median(kld)),
        kld_p99=float(np.percentile(kld, 99)),
        kld_max=float(kld.max()),
        top1_agreement=totals.top1_agreement,
        seconds=seconds,
    )
