"""How a person sees a score report: a Markdown table with bars, and an optional bar chart PNG."""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType

from .errors import GatenormError
from .fileio import atomic_output
from .scoring import ScoreReport

BAR_WIDTH = 30


def markdown_table(report: ScoreReport) -> str:
    """Layer, score, prune rank (1 = removed first; layer 0 is always kept) and a bar scaled to the maximum."""
    rank = {layer: position for position, layer in enumerate(report.prune_order, start=1)}
    top = max((entry.score for entry in report.layers), default=0.0) or 1.0
    lines = ["| layer | score | prune rank | coupling |", "|---:|---:|---:|:---|"]
    for entry in report.layers:
        bar = "█" * max(1, round(BAR_WIDTH * entry.score / top)) if entry.score > 0 else ""
        shown_rank = str(rank[entry.layer]) if entry.layer in rank else "kept"
        lines.append(f"| {entry.layer} | {entry.score:.6g} | {shown_rank} | {bar} |")
    return "\n".join(lines) + "\n"


def prune_order_line(report: ScoreReport) -> str:
    return "Suggested prune order (least coupled first; layer 0 is never pruned): " + ", ".join(
        str(layer) for layer in report.prune_order
    )


def require_matplotlib() -> ModuleType:
    """matplotlib.pyplot with the file-only Agg backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise GatenormError("--plot needs matplotlib: pip install 'gatenorm-edge[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(report: ScoreReport, path: Path) -> None:
    """A bar chart of the scores by layer, prune candidates highlighted, written atomically as PNG."""
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
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    with atomic_output(path) as handle:
        handle.write(buffer.getvalue())
