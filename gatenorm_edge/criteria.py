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
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GatenormError
from .fileio import work_folder
from .evaluation import ChunkSpan, PrunedEvaluator, TextChunks
from .harness.text import bos_chunk
from .reference import ReferenceModel
from .options import BASELINES, CRITERIA, DATA_DRIVEN, SELF, VARIANTS, WEIGHT_CRITERIA, comma_ints
from .scoring import ScoreReport, prune_order, score_model
from .sources.geometry import ModelGeometry, gguf_geometry
from .sources.gguf_file import GGUFFile



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
    calibration: ChunkSpan | None = None  # data-driven criteria: the chunks they were calibrated on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def loo_scores(evaluate: PrunedEvaluator, n_layers: int) -> list[float | None]:
    """Calibration perplexity with each single attention sublayer 1..n-1 removed."""
    return [None] + [evaluate([layer]) for layer in range(1, n_layers)]


def greedy_order(evaluate: PrunedEvaluator, n_layers: int, steps: int) -> tuple[list[int], list[frozenset[int]]]:
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
        chunk = bos_chunk(calibration.tokens, index, calibration.ctx, calibration.bos_token)
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
    evaluate: PrunedEvaluator | None = None,
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
        return CriterionResult(criterion, str(model), n_layers, scores, prune_order(scores), time.perf_counter() - started)
    if criterion in BASELINES:
        scores = baseline_scores(n_layers, criterion, seed)
        return CriterionResult(criterion, str(model), n_layers, scores, prune_order(scores), time.perf_counter() - started)
    if evaluate is None and calibration is None:
        raise GatenormError(f"the {criterion} criterion needs a calibration text")
    if criterion == "cosine":
        calibration = calibration or evaluate.chunks
        scores = cosine_scores(model, calibration)
        elapsed = time.perf_counter() - started
        return CriterionResult(
            criterion, str(model), n_layers, scores, prune_order(scores), elapsed, 0, calibration.span
        )
    with contextlib.ExitStack() as stack:
        if evaluate is None:
            workdir = stack.enter_context(work_folder("calibration"))
            evaluate = PrunedEvaluator(model, calibration, workdir, n_threads)
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
    model: Path | str, criterion: str, evaluate: PrunedEvaluator, n_layers: int, steps: int | None, started: float
) -> CriterionResult:
    """loo-ppl or greedy-ppl; ``seconds`` counts cached evaluations at what they cost when first run."""
    before = set(evaluate.points)
    if criterion == "loo-ppl":
        scores = loo_scores(evaluate, n_layers)
        used = [frozenset([layer]) for layer in range(1, n_layers)]
        order = prune_order(scores)
    else:
        order, used = greedy_order(evaluate, n_layers, n_layers - 1 if steps is None else steps)
        scores = [None] + [0.0] * (n_layers - 1)
        for step, layer in enumerate(order, start=1):
            scores[layer] = float(step)
    reused = set(used) & before
    seconds = time.perf_counter() - started + evaluate.cost(reused)
    return CriterionResult(
        criterion, str(model), n_layers, scores, order, seconds, len(set(used)), evaluate.chunks.span
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


# --------------------------------------------------------------------------------------------
# The layer choice of `prune` (and of the demo, through its default)


def choose_layers(
    model: Path,
    layers: str | None,
    count: int | None,
    variant: str | None,
    plan: Path | None,
    criterion: str | None = None,
    criterion_text: Path | None = None,
    criterion_chunks: int = 1,
) -> tuple[list[int] | None, dict[str, str]]:
    """The layers to prune and the provenance that explains how they were chosen.

    ``None`` layers mean the self-calibrated choice (``--criterion self``, the default for ``--count``),
    which ``selfprune`` makes together with the patches.
    """
    modes = [name for name, given in (("--layers", layers), ("--count", count), ("--plan", plan)) if given is not None]
    if modes not in (["--layers"], ["--count"], ["--plan"], ["--count", "--plan"]):
        raise GatenormError("give exactly one of --layers, --count or --plan (--count may go with --plan)")
    if layers is not None:
        if criterion is not None or variant is not None:
            raise GatenormError("--criterion or --variant chooses the --count layers; it does not go with --layers")
        return comma_ints("--layers", layers, "12,20,25"), {"selection": "layers"}
    if count is None:
        raise GatenormError("--plan needs --count K: how many of the plan's lowest-scored layers to remove")
    if criterion is not None and (plan is not None or variant is not None):
        raise GatenormError("--criterion, --variant and --plan are three ways to choose layers: give one")
    if criterion is None and variant is None and plan is None or criterion == SELF:
        return None, {}
    if criterion is not None and criterion not in VARIANTS:
        ranking = choose_by_criterion(model, criterion, count, calib_text=criterion_text, calib_chunks=criterion_chunks)
        chosen = ranking.prune_order[:count]
        return chosen, {
            "selection": f"criterion {criterion}",
            "scores": json.dumps({str(layer): ranking.scores[layer] for layer in chosen}),
        }
    if plan is not None:
        report = ScoreReport.from_json(plan)
        n_layers = gguf_geometry(model).n_layers
        if report.n_layers != n_layers:
            raise GatenormError(f"{plan} scores a {report.n_layers}-layer model, but {model} has {n_layers} layers")
        selection = f"plan {plan.name}"
    else:
        report = score_model(model, variant=criterion or variant or "per-head", progress=True)
        selection = "score"
    if not 1 <= count <= len(report.prune_order):
        raise GatenormError(f"--count must be between 1 and {len(report.prune_order)}, not {count}")
    chosen = report.prune_order[:count]
    scores = {entry.layer: entry.score for entry in report.layers}
    return chosen, {
        "selection": selection,
        "variant": report.variant,
        "scores": json.dumps({str(layer): scores.get(layer) for layer in chosen}),
    }
