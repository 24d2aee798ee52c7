"""Perplexity exactly as llama.cpp's ``llama-perplexity`` computes it (tools/perplexity/perplexity.cpp).

The whole text is tokenized once (BOS added when the vocab adds one); it is cut into ``len // ctx``
non-overlapping chunks of ``ctx`` tokens (at least two chunks' worth of tokens are required, as there);
each chunk is evaluated from an empty KV cache with its first token replaced by BOS when the vocab adds
BOS; only the second half is scored: the logits at positions ``ctx/2 .. ctx-2`` predict the tokens at
``ctx/2+1 .. ctx-1``. PPL = exp(mean NLL); its standard error is ``PPL * sqrt(var(NLL) / (n - 1))``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import GatenormError
from ..fileio import proc_bytes
from ..options import DEFAULT_CACHE_TYPE
from .model import LoadedModel, open_model
from ..progress import progress_bar
from .logprobs import token_nll
from .text import bos_chunk, read_text

MIN_CTX = 8


@dataclass
class NllStats:
    """Running sums of per-token negative log-likelihoods, kept as llama-perplexity keeps them."""

    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    def add(self, nll: np.ndarray) -> None:
        self.total += float(nll.sum())
        self.total_sq += float(np.square(nll).sum())
        self.count += int(nll.size)

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def ppl(self) -> float:
        return float(np.exp(self.mean))

    @property
    def ppl_stderr(self) -> float:
        """llama-perplexity's ``PPL +/- x``: PPL times the standard error of the mean NLL (0 when undefined)."""
        variance = self.total_sq / self.count - self.mean**2
        if variance <= 0 or self.count < 2:
            return 0.0
        return float(np.sqrt(variance / (self.count - 1)) * self.ppl)


@dataclass
class PerplexityResult:
    """One model's perplexity on one text; ``to_dict`` is the ``ppl --json`` contract."""

    model: str
    text: str
    ctx: int
    chunks: int
    tokens_scored: int
    ppl: float
    ppl_stderr: float
    seconds: float
    flash_attn: bool
    cache_type: str = DEFAULT_CACHE_TYPE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_stats(
        cls, model: Path | str, text: Path | str, ctx: int, chunks: int, stats: NllStats, seconds: float,
        flash_attn: bool, cache_type: str,
    ) -> PerplexityResult:
        return cls(
            model=str(model), text=str(text), ctx=ctx, chunks=chunks, tokens_scored=stats.count,
            ppl=stats.ppl, ppl_stderr=stats.ppl_stderr, seconds=seconds, flash_attn=flash_attn, cache_type=cache_type,
        )


def count_chunks(n_tokens: int, ctx: int, requested: int | None) -> int:
    """How many chunks llama-perplexity evaluates: ``n_tokens // ctx``, capped at ``requested``."""
    if ctx < MIN_CTX:
        raise GatenormError(f"context {ctx} is too small (at least {MIN_CTX} tokens)")
    if n_tokens < 2 * ctx:
        raise GatenormError(
            f"the text is too short: {n_tokens} tokens, but a context of {ctx} needs at least {2 * ctx} "
            "(as llama-perplexity requires)"
        )
    if requested is not None and requested < 1:
        raise GatenormError(f"--chunks must be at least 1, got {requested}")
    available = n_tokens // ctx
    return available if requested is None else min(requested, available)


def chunk_logits(model: LoadedModel, tokens: np.ndarray, index: int, ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of chunk ``index``'s scored half and the tokens they predict (rows x vocab, rows)."""
    start = index * ctx
    chunk = bos_chunk(tokens, index, ctx, model.bos_token)
    first = ctx // 2
    model.clear()
    logits = model.logits(chunk, output_from=first)[:-1]
    return logits, tokens[start + first + 1 : start + ctx]


@contextlib.contextmanager
def models_on_text(
    paths: Sequence[Path | str], text: Path | str, ctx: int, chunks: int | None, flash_attn: bool, n_threads: int | None,
    cache_type: str = DEFAULT_CACHE_TYPE,
) -> Iterator[tuple[list[LoadedModel], np.ndarray, int]]:
    """The models at ``paths`` opened for chunks of ``ctx`` tokens, the tokens of ``text`` (the first model's
    tokenizer; the others must share its vocabulary) and the number of chunks to evaluate."""
    content = read_text(text)
    with contextlib.ExitStack() as stack:
        models = [
            stack.enter_context(contextlib.closing(
                open_model(path, n_ctx=ctx, flash_attn=flash_attn, n_threads=n_threads, cache_type=cache_type)))
            for path in paths
        ]
        first = models[0]
        for path, model in zip(paths[1:], models[1:]):
            if model.vocab_size != first.vocab_size or model.bos_token != first.bos_token:
                raise GatenormError(f"{paths[0]} and {path} have different vocabularies")
        check_memory(sum(logit_bytes(model, ctx) for model in models), f"--ctx {ctx}")
        tokens = np.asarray(first.tokenize_text(content), dtype=np.int64)
        yield models, tokens, count_chunks(len(tokens), ctx, chunks)


def logit_bytes(model: LoadedModel, ctx: int) -> int:
    """The float32 logits a chunk of ``ctx`` holds at once: llama.cpp's output rows (one batch) and ours (the
    scored half of the chunk)."""
    return 4 * model.vocab_size * (model.n_batch + ctx // 2)


def check_memory(need: int, what: str) -> None:
    """A one-line error when ``need`` bytes, plus 1 GiB for the rest of the process, exceed the memory the
    system has available (Linux's MemAvailable; no check elsewhere)."""
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None and need + 2**30 > available:
        raise GatenormError(
            f"{what} needs about {need / 2**30:.1f} GiB of logits and this machine has {available / 2**30:.1f} GiB "
            "available; use a smaller --ctx"
        )



def perplexity(
    model_path: Path | str,
    text: Path | str,
    ctx: int = 512,
    chunks: int | None = None,
    progress: bool = False,
    *,
    flash_attn: bool = True,
    n_threads: int | None = None,
    cache_type: str = DEFAULT_CACHE_TYPE,
) -> PerplexityResult:
    """Perplexity of the GGUF at ``model_path`` on the UTF-8 text file ``text`` (llama-perplexity's method)."""
    started = time.perf_counter()
    with models_on_text([model_path], text, ctx, chunks, flash_attn, n_threads, cache_type) as ([model], tokens, n_chunks):
        stats = NllStats()
        with progress_bar(f"perplexity {Path(model_path).name}", n_chunks, progress) as tick:
            for index in range(n_chunks):
                stats.add(token_nll(*chunk_logits(model, tokens, index, ctx)))
                tick(status=f"PPL {stats.ppl:.4f}")
    return PerplexityResult.from_stats(
        model_path, text, ctx, n_chunks, stats, time.perf_counter() - started, flash_attn, cache_type
    )
