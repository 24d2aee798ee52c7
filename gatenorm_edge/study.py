"""How well does each criterion choose layers? PPL and KLD against the number of removed attention sublayers.

For every criterion (see :mod:`gatenorm_edge.criteria`) and every count k, the k first layers of its prune
order are removed with ``prune_gguf`` (into a temporary folder) and the pruned model is evaluated in
llama.cpp with flash attention on, on the same evaluation chunks as the base model, by llama-perplexity's
method: perplexity, and the KL divergence of its next-token distributions from the base model's. Identical
layer sets are evaluated once. The base model's logits are computed once and kept on disk (memory-mapped).

Data-driven criteria are calibrated on other tokens than the evaluation: by default the first
``calib_chunks`` chunks of the text, the evaluation starting after them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from .criteria import CRITERIA, DATA_DRIVEN, CriterionResult, rank_layers, spearman_vs
from .evaluation import ChunkSpan, EvalPoint, PrunedEvaluator, TextChunks
from .errors import GatenormError
from .fileio import work_folder
from .progress import progress_bar
from .sources.geometry import gguf_geometry

DEFAULT_CRITERION = "per-head"  # what `prune --count` uses: the one held to the 10% bar
ORACLE = "greedy-ppl"
RANK_REFERENCE = "loo-ppl"
BAR = 0.10


@dataclass
class CriterionStudy:
    """A criterion's ranking, its agreement with ``loo-ppl`` and its PPL/KLD at each count."""

    ranking: CriterionResult
    spearman_vs_loo_ppl: float | None
    points: list[EvalPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.ranking.to_dict(), "spearman_vs_loo_ppl": self.spearman_vs_loo_ppl, "points": [asdict(p) for p in self.points]}


@dataclass
class StudyResult:
    """Everything the study measured; ``to_dict`` is the ``study --json`` contract."""

    model: str
    n_layers: int
    counts: list[int]
    flash_attn: bool
    threads: int | None
    calibration: ChunkSpan | None
    evaluation: ChunkSpan
    tokens_scored: int
    base_ppl: float
    base_ppl_stderr: float
    models_evaluated: int
    criteria: list[CriterionStudy]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        data = {key: value for key, value in asdict(self).items() if key not in ("criteria", "tokens_scored")}
        data["calibration"] = data["calibration"] or {}
        data["evaluation"] |= {"tokens_scored": self.tokens_scored}
        data["criteria"] = [study.to_dict() for study in self.criteria]
        return data

    def criterion(self, name: str) -> CriterionStudy | None:
        return next((study for study in self.criteria if study.ranking.criterion == name), None)


def _check_request(model: Path, counts: Sequence[int], criteria: Sequence[str]) -> int:
    n_layers = gguf_geometry(model).n_layers
    unknown = [name for name in criteria if name not in CRITERIA]
    if unknown:
        raise GatenormError(f"unknown criteria {', '.join(unknown)} (choose from {', '.join(CRITERIA)})")
    if not criteria:
        raise GatenormError("give at least one criterion")
    bad = [k for k in counts if not 1 <= k <= n_layers - 2]
    if not counts or bad:
        raise GatenormError(f"counts must be between 1 and {n_layers - 2} for a {n_layers}-layer model (got {list(counts)})")
    return n_layers


def run_study(
    model: Path | str,
    text: Path | str,
    *,
    counts: Sequence[int] = (1, 2, 4, 6, 8),
    criteria: Sequence[str] = CRITERIA,
    ctx: int = 512,
    chunks: int = 4,
    calib_text: Path | str | None = None,
    calib_ctx: int = 512,
    calib_chunks: int = 1,
    seed: int = 0,
    n_threads: int | None = None,
    progress: bool = False,
) -> StudyResult:
    """Rank layers by every criterion, then evaluate each criterion's first k layers removed, for every k.

    Calibration: ``calib_chunks`` chunks of ``calib_ctx`` tokens of ``calib_text`` (default: the start of
    ``text``; the evaluation's ``chunks`` chunks of ``ctx`` tokens then start after them).
    """
    started = time.perf_counter()
    model = Path(model)
    counts = sorted(set(counts))
    criteria = list(dict.fromkeys(criteria))
    n_layers = _check_request(model, counts, criteria)
    console = Console(stderr=True, quiet=not progress)
    same_text = calib_text is None or Path(calib_text).resolve() == Path(text).resolve()
    first_eval_chunk = math.ceil(calib_chunks * calib_ctx / ctx) if same_text else 0
    with work_folder("study") as workdir:
        evaluation = TextChunks.from_text(model, text, ctx, chunks, first_eval_chunk)
        calibration = None
        if any(name in DATA_DRIVEN for name in criteria):
            calibration = TextChunks.from_text(model, calib_text or text, calib_ctx, calib_chunks)
        calibrate = PrunedEvaluator(model, calibration, workdir, n_threads) if calibration else None
        rankings: dict[str, CriterionResult] = {}
        # loo-ppl first: greedy-ppl's first step reuses its evaluations (and reports their cost as its own).
        for name in sorted(criteria, key=lambda name: name != "loo-ppl"):
            with console.status(f"ranking layers by {name}") as status:
                if calibrate is not None:
                    calibrate.on_evaluated = lambda count, name=name: status.update(
                        f"ranking layers by {name}: {count} pruned models evaluated on the calibration text"
                    )
                rankings[name] = rank_layers(
                    model, name, evaluate=calibrate, steps=max(counts), seed=seed, n_threads=n_threads
                )
            console.print(f"{name}: {rankings[name].seconds:.2f} s, order {rankings[name].prune_order[: max(counts)]}")
        with console.status("evaluating the base model"):
            evaluate = PrunedEvaluator(model, evaluation, workdir, n_threads, divergence=True)
        wanted = {frozenset(rankings[name].prune_order[:k]) for name in criteria for k in counts}
        with progress_bar("evaluating pruned models", len(wanted), progress) as tick:
            for layers in sorted(wanted, key=lambda s: (len(s), sorted(s))):
                point = evaluate.point(sorted(layers))
                tick(status=f"k={point.k} PPL {point.ppl:.3f}")
        reference = rankings.get(RANK_REFERENCE)
        studies = [
            CriterionStudy(
                ranking=rankings[name],
                spearman_vs_loo_ppl=spearman_vs(reference, rankings[name]) if reference else None,
                points=[evaluate.point(rankings[name].prune_order[:k]) for k in counts],
            )
            for name in criteria
        ]
    return StudyResult(
        model=str(model),
        n_layers=n_layers,
        counts=counts,
        flash_attn=True,
        threads=n_threads,
        calibration=calibration.span if calibration else None,
        evaluation=evaluation.span,
        tokens_scored=evaluate.base_stats.count,
        base_ppl=evaluate.base_stats.ppl,
        base_ppl_stderr=evaluate.base_stats.ppl_stderr,
        models_evaluated=len(evaluate.points),
        criteria=studies,
        seconds=time.perf_counter() - started,
    )
