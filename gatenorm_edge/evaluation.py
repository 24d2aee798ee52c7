"""What a pruned variant of a model scores on fixed chunks of a text: its PPL and, against the base model,
its KLD; cached by layer set, so criteria and the study that share candidates evaluate each once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import GatenormError
from .harness.kld import DivergenceTotals, token_divergence
from .harness.logprobs import stderr_of_mean, token_nll
from .harness.model import open_model
from .harness.perplexity import NllStats, chunk_logits, count_chunks
from .harness.text import read_text
from .rewrite import prune_gguf


@dataclass(frozen=True)
class ChunkSpan:
    """Which tokens of which text: ``chunks`` x ``ctx`` tokens from chunk ``first_chunk`` on."""

    text: str
    ctx: int
    first_chunk: int
    chunks: int


@dataclass(frozen=True)
class TextChunks:
    """``chunks`` x ``ctx`` tokens of ``text`` (tokenized as llama-perplexity does), from chunk ``first_chunk`` on."""

    text: str
    ctx: int
    first_chunk: int
    chunks: int
    bos_token: int | None
    tokens: np.ndarray = field(repr=False, compare=False)

    @classmethod
    def from_text(
        cls, model: Path | str, text: Path | str, ctx: int = 512, chunks: int = 1, first_chunk: int = 0
    ) -> TextChunks:
        """Tokenize ``text`` with the model's tokenizer and keep the chosen chunks."""
        content = read_text(text)
        with contextlib.closing(open_model(model, n_ctx=ctx)) as loaded:
            tokens = np.asarray(loaded.tokenize_text(content), dtype=np.int64)
            bos_token = loaded.bos_token
        available = count_chunks(len(tokens), ctx, None)
        if chunks < 1 or first_chunk < 0 or first_chunk + chunks > available:
            raise GatenormError(
                f"{text}: has {available} chunks of {ctx} tokens; cannot take {chunks} from chunk {first_chunk}"
            )
        kept = tokens[first_chunk * ctx : (first_chunk + chunks) * ctx]
        return cls(str(text), ctx, first_chunk, chunks, bos_token, kept)

    @property
    def span(self) -> ChunkSpan:
        return ChunkSpan(self.text, self.ctx, self.first_chunk, self.chunks)


@dataclass
class EvalPoint:
    """One pruned model on the evaluation chunks (KLD and top-1 agreement only when measured)."""

    k: int
    layers: list[int]
    ppl: float
    ppl_stderr: float
    kld: float | None = None
    kld_stderr: float | None = None
    top1_agreement: float | None = None


class PrunedEvaluator:
    """The model with a set of attention sublayers removed, on fixed chunks, cached by that set: its PPL
    and, with ``divergence``, its KLD from the base model (whose logits are kept in ``workdir``).

    Each set is written once to ``workdir`` with ``prune_gguf`` and evaluated in llama.cpp (flash attention
    on). ``seconds[key]`` keeps what each evaluation cost, so a criterion reusing another's evaluations can
    still report what it would have cost alone.
    """

    def __init__(
        self, model: Path | str, chunks: TextChunks, workdir: Path, n_threads: int | None = None, divergence: bool = False
    ) -> None:
        self.model = Path(model)
        self.chunks = chunks
        self.workdir = Path(workdir)
        self.n_threads = n_threads
        self.divergence = divergence
        self.points: dict[frozenset[int], EvalPoint] = {}
        self.seconds: dict[frozenset[int], float] = {}
        self.on_evaluated: Callable[[int], None] = lambda count: None  # told how many sets are evaluated so far
        self.base_stats = NllStats()
        if divergence:
            c = chunks
            with contextlib.closing(open_model(self.model, n_ctx=c.ctx, n_threads=n_threads)) as base:
                rows = c.ctx - c.ctx // 2 - 1
                self.base_logits = np.lib.format.open_memmap(
                    self.workdir / "base-logits.npy", mode="w+", dtype=np.float32, shape=(c.chunks, rows, base.vocab_size)
                )
                for index in range(c.chunks):
                    logits, targets = chunk_logits(base, c.tokens, index, c.ctx)
                    self.base_logits[index] = logits
                    self.base_stats.add(token_nll(logits, targets))

    def point(self, layers: Iterable[int]) -> EvalPoint:
        key = frozenset(layers)
        if key not in self.points:
            started = time.perf_counter()
            path = self.model
            if key:
                path = self.workdir / f"candidate-{'kld' if self.divergence else 'ppl'}.gguf"
                prune_gguf(self.model, path, sorted(key), force=True)
            self.points[key] = self._measure(path, key)
            self.seconds[key] = time.perf_counter() - started
            self.on_evaluated(len(self.points))
        return self.points[key]

    def _measure(self, path: Path, key: frozenset[int]) -> EvalPoint:
        c = self.chunks
        with contextlib.closing(open_model(path, n_ctx=c.ctx, n_threads=self.n_threads)) as loaded:
            if not self.divergence:
                stats = NllStats()
                for index in range(c.chunks):
                    stats.add(token_nll(*chunk_logits(loaded, c.tokens, index, c.ctx)))
                return EvalPoint(k=len(key), layers=sorted(key), ppl=stats.ppl, ppl_stderr=stats.ppl_stderr)
            totals = DivergenceTotals()
            for index in range(c.chunks):
                logits, targets = chunk_logits(loaded, c.tokens, index, c.ctx)
                totals.add(token_divergence(self.base_logits[index], logits, targets))
        values = totals.kld()
        return EvalPoint(
            k=len(key),
            layers=sorted(key),
            ppl=totals.other.ppl,
            ppl_stderr=totals.other.ppl_stderr,
            kld=float(values.mean()),
            kld_stderr=stderr_of_mean(values),
            top1_agreement=totals.top1_agreement,
        )

    def __call__(self, layers: Iterable[int]) -> float:
        """The PPL with ``layers`` removed (what the data-driven criteria rank by)."""
        return self.point(layers).ppl

    def cost(self, keys: Iterable[frozenset[int]]) -> float:
        return sum(self.seconds[key] for key in set(keys))
