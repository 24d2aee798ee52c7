"""Plots (PNG, written atomically): the scores of a model's layers, the criteria study, and the frontier of
speed against perplexity. matplotlib is optional (the ``plot`` extra): a command that wants a plot checks for it
first and says in one line what to install."""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import GatenormError
from .fileio import atomic_output
from .options import DATA_DRIVEN

if TYPE_CHECKING:
    from .frontier import FrontierResult
    from .scoring import ScoreReport
    from .study import StudyResult


def require_matplotlib() -> ModuleType:
    """matplotlib.pyplot with the file-only Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise GatenormError("--plot needs matplotlib: pip install 'gatenorm-edge[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path, dpi: int = 120) -> None:
    """Render a matplotlib figure to PNG and write it atomically; the figure is closed."""
    plt = require_matplotlib()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    with atomic_output(path) as handle:
        handle.write(buffer.getvalue())


def save_score_plot(report: ScoreReport, path: Path) -> None:
    """A bar chart of the scores by layer, the least coupled quarter highlighted."""
    plt = require_matplotlib()
    first = set(report.prune_order[: max(1, len(report.prune_order) // 4)])
    layers = [entry.layer for entry in report.layers]
    colors = ["tab:red" if layer in first else "tab:blue" for layer in layers]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.25 * len(layers)), 3.5))
    axes.bar(layers, [entry.score for entry in report.layers], color=colors)
    axes.set_xlabel("layer")
    axes.set_ylabel(f"Gate-Norm score ({report.variant})")
    axes.set_title(f"{Path(report.model).name}: red = least coupled quarter")
    figure.tight_layout()
    save_figure(figure, path)


def save_study_plots(result: StudyResult, folder: Path) -> list[Path]:
    """``<model>-ppl-kld.png`` (PPL and KLD against k per criterion) and ``<model>-scores.png`` (per-layer scores)."""
    plt = require_matplotlib()
    stem = Path(result.model).stem
    paths = [folder / f"{stem}-ppl-kld.png", folder / f"{stem}-scores.png"]
    figure, (ppl_axes, kld_axes) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.get_cmap("tab20").colors
    ks = [0] + result.counts
    for index, study in enumerate(result.criteria):
        style = dict(linestyle="--" if study.ranking.criterion in DATA_DRIVEN else "-", marker="o", color=colors[index % 20])
        ppl_axes.plot(ks, [result.base_ppl] + [p.ppl for p in study.points], **style)
        kld_axes.plot(ks, [0.0] + [p.kld for p in study.points], label=study.ranking.criterion, **style)
    ppl_axes.set_yscale("log")
    for axes, label in ((ppl_axes, "perplexity (log scale)"), (kld_axes, "KL divergence from base (nats/token)")):
        axes.set_xlabel("attention sublayers removed (k)")
        axes.set_ylabel(label)
        axes.set_xticks(ks)
        axes.grid(alpha=0.3)
    kld_axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), title="dashed: data-driven", title_fontsize=8)
    figure.suptitle(f"{Path(result.model).name}: evaluation {result.evaluation.chunks} x {result.evaluation.ctx} tokens, FA on")
    figure.tight_layout()
    save_figure(figure, paths[0], dpi=110)

    layers = list(range(1, result.n_layers))
    figure, axes_list = plt.subplots(len(result.criteria), 1, figsize=(max(6.0, 0.28 * len(layers)), 1.3 * len(result.criteria) + 0.6), sharex=True, squeeze=False)
    for axes, study in zip(axes_list[:, 0], result.criteria):
        values = np.array([study.ranking.scores[i] for i in layers], dtype=np.float64)
        spread = np.ptp(values) or 1.0
        first = set(study.ranking.prune_order[: max(result.counts)])
        colors = ["tab:red" if i in first else "tab:blue" for i in layers]
        axes.bar(layers, 0.05 + (values - values.min()) / spread, color=colors)
        rho = "" if study.spearman_vs_loo_ppl is None else f"  ρ={study.spearman_vs_loo_ppl:+.2f}"
        axes.set_ylabel(study.ranking.criterion + rho, rotation=0, ha="right", va="center", fontsize=8)
        axes.set_yticks([])
    axes_list[-1, 0].set_xlabel(f"layer (red: the first {max(result.counts)} removed; bars: score scaled to its min..max, low = removed first)")
    axes_list[-1, 0].set_xticks(layers)
    figure.tight_layout()
    save_figure(figure, paths[1], dpi=110)
    return paths


def save_frontier_plot(result: FrontierResult, path: Path) -> None:
    save_figure(frontier_figure(result), path)


def frontier_figure(result: FrontierResult) -> Any:
    """tg speedup at the depth (x) against PPL over the base's (y), one marker per kind of variant, the KV-cache
    type in the label; the Pareto frontier joined by a line. The y axis is logarithmic when the ratios span more
    than 10x (a q4_0 cache can multiply a model's PPL by hundreds), so the points near 1 stay apart."""
    plt = require_matplotlib()
    figure, axes = plt.subplots(figsize=(7.5, 5.0))
    markers = {"base": "s", "drop": "o", "window": "^"}
    for point in result.points:
        axes.scatter(point.tg_speedup, point.ppl_ratio, marker=markers[point.variant.kind], s=46,
                     color="tab:red" if point.frontier else "tab:blue", zorder=3)
        axes.annotate(point.variant.name, (point.tg_speedup, point.ppl_ratio), fontsize=7, xytext=(4, 3),
                      textcoords="offset points")
    best = sorted((p for p in result.points if p.frontier), key=lambda p: p.tg_speedup)
    axes.plot([p.tg_speedup for p in best], [p.ppl_ratio for p in best], color="tab:red", alpha=0.6, zorder=2)
    axes.set_xlabel(f"tg speedup at depth {result.depth} over the base with an F16 KV cache (FA on, {result.threads} threads)")
    axes.set_ylabel(f"PPL ÷ base's (ctx {result.ctx}, {result.points[0].tokens} tokens)")
    axes.set_title(f"{Path(result.model).name}: squares base, circles drops, triangles windows ({result.window} tokens)",
                   fontsize=9)
    ratios = [point.ppl_ratio for point in result.points]
    if max(ratios) > 10 * min(ratios):
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure
