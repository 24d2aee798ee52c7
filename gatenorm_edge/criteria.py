"""Ways to choose which attention sublayers to remove, each one ranking layers 1..n-1 (layer 0 is always kept).

Every criterion gives each prunable layer a score where *lower means remove first*, and a prune order.

Data-free (weights only, or nothing at all):
- ``per-head``, ``full``, ``folded``: the Gate-Norm variants of :mod:`gatenorm_edge.scoring`.
- ``ov``:     how much a layer can write to the residual stream, sqrt(sum_h ||O_h V_g(h) diag(gain)||_F^2),
              per head from head_dim x head_dim Gram matrices (the attention-norm gain folded into V).
- ``qk-ov``:  sqrt(folded x ov): query-key coupling weighed by what the layer can write.
- ``random``: a seeded random order; ``last``: the last layers first; ``first``: layers 1, 2, ... first.

Data-driven, on calibration chunks (llama-perplexity's method, see :mod:`gatenorm_edge.harness.perplexity`):
- ``loo-ppl``:    perplexity with that single attention sublayer removed (each pruned model is written with
                  ``prune_gguf`` and run in llama.cpp, flash attention on).
- ``greedy-ppl``: repeatedly remove the layer whose removal (on top of those already removed) hurts least;
                  the score is the step at which a layer goes, layers never removed follow in the order of
                  the last step's perplexities.
- ``cosine``:     1 - cos(x, x + attention(x)) averaged over the calibration tokens, x the residual stream
                  entering the layer, from the NumPy reference forward pass ("What Matters in
                  Transformers? Not All Attention is Needed").
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GatenormError
from .fileio import work_folder
from .harness.model import open_model
from .harness.perplexity import NllStats, chunk_logits, count_chunks, token_nll
from .harness.text import read_text
from .reference import ReferenceModel
from .rewrite import prune_gguf
from .scoring import VARIANTS, score_model
from .sources.geometry import ModelGeometry, gguf_geometry
from .sources.gguf_file import GGUFFile

WEIGHT_CRITERIA = VARIANTS + ("ov", "qk-ov")
BASELINES = ("random", "last", "first")
DATA_DRIVEN = ("loo-ppl", "greedy-ppl", "cosine")
CRITERIA = WEIGHT_CRITERIA + BASELINES + DATA_DRIVEN


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

    def describe(self) -> dict[str, Any]:
        return {"text": self.text, "ctx": self.ctx, "first_chunk": self.first_chunk, "chunks": self.chunks}


class PrunedPerplexity:
    """Calibration perplexity of the model with a set of attention sublayers removed, cached by that set.

    Each set is written once to ``workdir`` with ``prune_gguf`` and evaluated in llama.cpp (flash attention
    on) on the calibration chunks. ``seconds[key]`` keeps what each evaluation cost, so a criterion reusing
    another's evaluations can still report what it would have cost alone.
    """

    def __init__(self, model: Path | str, calibration: TextChunks, workdir: Path, n_threads: int | None = None) -> None:
        self.model = Path(model)
        self.calibration = calibration
        self.workdir = Path(workdir)
        self.n_threads = n_threads
        self.ppl: dict[frozenset[int], float] = {}
        self.seconds: dict[frozenset[int], float] = {}
        self.on_evaluated: Callable[[int], None] = lambda count: None  # told how many sets are evaluated so far

    def __call__(self, layers: Iterable[int]) -> float:
        key = frozenset(layers)
        if key not in self.ppl:
            started = time.perf_counter()
            path = self.model
            if key:
                path = self.workdir / "calibration-candidate.gguf"
                prune_gguf(self.model, path, sorted(key), force=True)
            c = self.calibration
            stats = NllStats()
            with contextlib.closing(open_model(path, n_ctx=c.ctx, n_threads=self.n_threads)) as loaded:
                for index in range(c.chunks):
                    stats.add(token_nll(*chunk_logits(loaded, c.tokens, index, c.ctx)))
            self.ppl[key] = stats.ppl
            self.seconds[key] = time.perf_counter() - started
            self.on_evaluated(len(self.ppl))
        return self.ppl[key]

    def cost(self, keys: Iterable[frozenset[int]]) -> float:
        return sum(self.seconds[key] for key in set(keys))


@dataclass
class CriterionResult:
    """One criterion's ranking: per-layer scores (lower = remove first; None where undefined) and the order."""

    criterion: str
    model: str
    n_layers: int
    scores: list[float | None]
    prune_order: list[int]
    seconds: float
    evaluations: int = 0
    calibration: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def order_by_score(scores: Sequence[float | None]) -> list[int]:
    """Layers 1..n-1 from lowest to highest score, ties by index."""
    return sorted(range(1, len(scores)), key=lambda layer: (scores[layer], layer))


def _head_grams(weights: np.ndarray, n_heads: int, along_rows: bool) -> np.ndarray:
    """Per-head Gram matrices (heads, d, d): heads are row blocks (X X^T) or column blocks (X^T X)."""
    if along_rows:
        blocks = weights.reshape(n_heads, -1, weights.shape[1])
        return blocks @ blocks.transpose(0, 2, 1)
    blocks = weights.reshape(weights.shape[0], n_heads, -1).transpose(1, 0, 2)
    return blocks.transpose(0, 2, 1) @ blocks


def ov_score(v: np.ndarray, o: np.ndarray, n_head: int, n_head_kv: int, gain: np.ndarray | None = None) -> float:
    """sqrt(sum_h ||O_h V_g(h) diag(gain)||_F^2) with ||O_h V_g||_F^2 = tr((O_h^T O_h)(V_g V_g^T)).

    ``v`` is (n_head_kv*head_dim, width), ``o`` is (width, n_head*head_dim), as GGUF stores them.
    """
    v = v.astype(np.float64) * (1.0 if gain is None else gain.astype(np.float64))
    v_grams = _head_grams(v, n_head_kv, along_rows=True)
    o_grams = _head_grams(o.astype(np.float64), n_head, along_rows=False)
    group = n_head // n_head_kv
    return math.sqrt(sum(float(np.sum(o_grams[h] * v_grams[h // group])) for h in range(n_head)))


def _ov_scores(model: Path | str) -> list[float]:
    gguf = GGUFFile(model)
    geometry = ModelGeometry.from_gguf(gguf)
    n_head, n_head_kv = geometry.uniform_heads(f"{model} (ov criterion)")
    return [
        ov_score(
            gguf.tensor(f"blk.{layer}.attn_v.weight"),
            gguf.tensor(f"blk.{layer}.attn_output.weight"),
            n_head,
            n_head_kv,
            gguf.tensor(f"blk.{layer}.attn_norm.weight"),
        )
        for layer in range(geometry.n_layers)
    ]


def _weight_scores(model: Path | str, criterion: str) -> list[float]:
    if criterion in VARIANTS:
        return [entry.score for entry in score_model(model, criterion).layers]
    ov = _ov_scores(model)
    if criterion == "ov":
        return ov
    folded = [entry.score for entry in score_model(model, "folded").layers]
    return [math.sqrt(qk * w) for qk, w in zip(folded, ov)]


def baseline_scores(n_layers: int, criterion: str, seed: int = 0) -> list[float | None]:
    """``random`` (a seeded permutation), ``last`` or ``first`` as scores; layer 0 has none."""
    prunable = n_layers - 1
    if criterion == "random":
        ranks = np.random.default_rng(seed).permutation(prunable) + 1
    elif criterion == "last":
        ranks = np.arange(prunable, 0, -1)
    elif criterion == "first":
        ranks = np.arange(1, prunable + 1)
    else:
        raise GatenormError(f"unknown baseline {criterion!r} (choose from {', '.join(BASELINES)})")
    return [None] + [float(rank) for rank in ranks]


def loo_scores(evaluate: PrunedPerplexity, n_layers: int) -> list[float | None]:
    """Calibration perplexity with each single attention sublayer 1..n-1 removed."""
    return [None] + [evaluate([layer]) for layer in range(1, n_layers)]


def greedy_order(evaluate: PrunedPerplexity, n_layers: int, steps: int) -> tuple[list[int], list[frozenset[int]]]:
    """Greedy removal for ``steps`` steps; the rest ordered by the last step's perplexities. Also the sets evaluated.

    At most n-2 steps: llama.cpp needs one layer besides layer 0 with attention, so the last one stays last.
    """
    removed: list[int] = []
    evaluated: list[frozenset[int]] = []
    remaining = list(range(1, n_layers))
    last_round: dict[int, float] = {}
    for _ in range(min(steps, n_layers - 2)):
        last_round = {}
        for layer in remaining:
            candidate = frozenset(removed + [layer])
            evaluated.append(candidate)
            last_round[layer] = evaluate(candidate)
        best = min(remaining, key=lambda layer: (last_round[layer], layer))
        removed.append(best)
        remaining.remove(best)
    rest = sorted(remaining, key=lambda layer: (last_round.get(layer, math.inf), layer))
    return removed + rest, evaluated


def cosine_scores(model: Path | str, calibration: TextChunks) -> list[float | None]:
    """Mean over calibration tokens of 1 - cos(x, x + attention(x)) per layer (reference forward pass).

    Each chunk is run as llama-perplexity runs it: from position 0, its first token replaced by BOS when the
    vocab adds one (the reference pass sees the same tokens llama.cpp does).
    """
    reference = ReferenceModel.from_gguf(model)
    n_layers = reference.args.n_layers
    totals = np.zeros(n_layers)
    count = 0
    for index in range(calibration.chunks):
        chunk = calibration.tokens[index * calibration.ctx : (index + 1) * calibration.ctx].copy()
        if calibration.bos_token is not None:
            chunk[0] = calibration.bos_token
        for layer, x, y in attention_residuals(reference, chunk):
            cos = np.sum(x * y, axis=-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
            totals[layer] += float(np.sum(1.0 - cos))
        count += len(chunk)
    return [None] + [float(total / count) for total in totals[1:]]


def attention_residuals(reference: ReferenceModel, tokens: np.ndarray) -> Iterable[tuple[int, np.ndarray, np.ndarray]]:
    """(layer, x, x + attention output) for every layer with attention, from one reference forward pass."""
    result = reference.forward_pass(tokens)
    for layer, (x, attention) in enumerate(zip(result.layer_inputs, result.attention_outputs)):
        if attention is not None:
            yield layer, x, x + attention


def rank_layers(
    model: Path | str,
    criterion: str,
    *,
    calibration: TextChunks | None = None,
    evaluate: PrunedPerplexity | None = None,
    steps: int | None = None,
    seed: int = 0,
    n_threads: int | None = None,
) -> CriterionResult:
    """Rank ``model``'s prunable attention sublayers by ``criterion``.

    Data-driven criteria need ``calibration`` (or an ``evaluate`` cache to share pruned-model perplexities
    between criteria); ``greedy-ppl`` runs ``steps`` greedy steps (default: all).
    """
    if criterion not in CRITERIA:
        raise GatenormError(f"unknown criterion {criterion!r} (choose from {', '.join(CRITERIA)})")
    started = time.perf_counter()
    n_layers = gguf_geometry(model).n_layers
    if n_layers < 2:
        raise GatenormError(f"{model}: only {n_layers} layer; layer 0 cannot be pruned, so there is nothing to rank")
    if criterion in WEIGHT_CRITERIA:
        scores: list[float | None] = list(_weight_scores(model, criterion))
        return CriterionResult(criterion, str(model), n_layers, scores, order_by_score(scores), time.perf_counter() - started)
    if criterion in BASELINES:
        scores = baseline_scores(n_layers, criterion, seed)
        return CriterionResult(criterion, str(model), n_layers, scores, order_by_score(scores), time.perf_counter() - started)
    if evaluate is None and calibration is None:
        raise GatenormError(f"the {criterion} criterion needs a calibration text")
    if criterion == "cosine":
        calibration = calibration or evaluate.calibration
        scores = cosine_scores(model, calibration)
        elapsed = time.perf_counter() - started
        return CriterionResult(
            criterion, str(model), n_layers, scores, order_by_score(scores), elapsed, 0, calibration.describe()
        )
    with contextlib.ExitStack() as stack:
        if evaluate is None:
            workdir = stack.enter_context(work_folder("calibration"))
            evaluate = PrunedPerplexity(model, calibration, workdir, n_threads)
        return _ppl_criterion(model, criterion, evaluate, n_layers, steps, started)


def choose_by_criterion(
    model: Path | str,
    criterion: str,
    count: int,
    *,
    calib_text: Path | str | None = None,
    calib_ctx: int = 512,
    calib_chunks: int = 1,
    seed: int = 0,
    n_threads: int | None = None,
) -> CriterionResult:
    """Rank layers for removing ``count`` of them (greedy-ppl runs ``count`` steps only)."""
    if criterion not in CRITERIA:
        raise GatenormError(f"unknown criterion {criterion!r} (choose from {', '.join(CRITERIA)})")
    n_layers = gguf_geometry(model).n_layers
    if not 1 <= count <= n_layers - 2:
        raise GatenormError(f"--count must be between 1 and {n_layers - 2} for a {n_layers}-layer model, not {count}")
    calibration = None
    if criterion in DATA_DRIVEN:
        if calib_text is None:
            raise GatenormError(f"the {criterion} criterion needs a calibration text")
        calibration = TextChunks.from_text(model, calib_text, calib_ctx, calib_chunks)
    return rank_layers(model, criterion, calibration=calibration, steps=count, seed=seed, n_threads=n_threads)


def _ppl_criterion(
    model: Path | str, criterion: str, evaluate: PrunedPerplexity, n_layers: int, steps: int | None, started: float
) -> CriterionResult:
    """loo-ppl or greedy-ppl; ``seconds`` counts cached evaluations at what they cost when first run."""
    before = set(evaluate.ppl)
    if criterion == "loo-ppl":
        scores = loo_scores(evaluate, n_layers)
        used = [frozenset([layer]) for layer in range(1, n_layers)]
        order = order_by_score(scores)
    else:
        order, used = greedy_order(evaluate, n_layers, n_layers - 1 if steps is None else steps)
        scores = [None] + [0.0] * (n_layers - 1)
        for step, layer in enumerate(order, start=1):
            scores[layer] = float(step)
    reused = set(used) & before
    seconds = time.perf_counter() - started + evaluate.cost(reused)
    return CriterionResult(
        criterion, str(model), n_layers, scores, order, seconds, len(set(used)), evaluate.calibration.describe()
    )


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``values``, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks (nan when a side is constant)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length, at least 2")
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    denominator = math.sqrt(float(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / denominator) if denominator > 0 else math.nan


def spearman_vs(reference: CriterionResult, other: CriterionResult) -> float:
    """Spearman rho of ``other``'s scores against ``reference``'s over the prunable layers 1..n-1."""
    layers = range(1, reference.n_layers)
    return spearman([other.scores[i] for i in layers], [reference.scores[i] for i in layers])

