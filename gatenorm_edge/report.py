"""Reports for people and machines: Markdown tables, JSON files and PNG plots (all written atomically)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .errors import GatenormError
from .fileio import atomic_output, write_text_atomic

if TYPE_CHECKING:
    from .harness.compare import CompareResult
    from .harness.perplexity import PerplexityResult
    from .harness.speed import BenchResult, Spread
    from .scoring import ScoreReport

BAR_WIDTH = 30


def write_json(path: Path | str, data: Any) -> None:
    """The one JSON writer: a result (anything with ``to_dict``) or plain data, indented, atomically."""
    plain = data.to_dict() if hasattr(data, "to_dict") else data
    write_text_atomic(Path(path), json.dumps(plain, indent=2) + "\n")


def write_markdown(path: Path | str, text: str) -> None:
    write_text_atomic(Path(path), text if text.endswith("\n") else text + "\n")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n_bytes: int | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.2f} MiB"


def fa_label(flash_attn: bool) -> str:
    return "FA on" if flash_attn else "FA off"


def ratio(after: float | None, before: float | None) -> str:
    return "" if not after or not before else f"{after / before:.3f}×"


ATTENTION_COST_LABELS = (
    ("flops", "attention FLOPs/token (matrices)"),
    ("flops_per_context_token", "attention FLOPs/token per cached token"),
    ("weight_bytes", "attention weight bytes/token"),
    ("kv_bytes", "KV-cache bytes/token (F16)"),
)


def attention_layer_kinds(cost: dict[str, Any]) -> str:
    """'26 attention, 2 linear, 2 free' from ``inspection.attention_cost``'s ``layers``."""
    return ", ".join(f"{len(cost['layers'][kind])} {kind}" for kind in ("attention", "linear", "free"))


def perplexity_markdown(result: PerplexityResult) -> str:
    """One ``ppl`` result as a one-row table."""
    header = ["model", "text", "ctx", "chunks", "tokens scored", "PPL", "attention", "seconds"]
    row = [
        Path(result.model).name,
        Path(result.text).name,
        str(result.ctx),
        str(result.chunks),
        str(result.tokens_scored),
        f"{result.ppl:.4f} ± {result.ppl_stderr:.4f}",
        fa_label(result.flash_attn),
        f"{result.seconds:.1f}",
    ]
    return markdown_table(header, [row])


def _spread(cell: Spread) -> str:
    return f"{cell.median:.1f} ({cell.min:.1f}–{cell.max:.1f})"


def bench_markdown(result: BenchResult) -> str:
    """A ``bench`` result: t/s median (min–max) per model and depth, then memory; ratios when two models."""
    fa = fa_label(result.flash_attn)
    models = result.models
    header = ["test", *[Path(m).name for m in models]]
    if len(models) > 1:
        header.append(f"{Path(models[1]).name} / {Path(models[0]).name}")
    rows: list[list[str]] = []
    for depth in map(str, result.depths):
        for kind, count in (("pp", result.prompt), ("tg", result.gen)):
            row = [f"{kind}{count} @ d{depth} t/s, {fa}"]
            row += [_spread(result.tps(kind)[m][depth]) for m in models]
            if len(models) > 1:
                row.append(f"{result.ratios[kind][depth]:.3f}×")
            rows.append(row)
    memory = [
        (f"KV cache ({result.kv_cells[models[0]]} cells, {fa})", result.kv_bytes, mib),
        ("peak RSS", result.rss_bytes, mib),
        ("load seconds", result.load_seconds, lambda s: f"{s:.2f}"),
    ]
    for label, values, show in memory:
        row = [label, *[show(values[m]) for m in models]]
        if len(models) > 1:
            row.append(ratio(values[models[1]], values[models[0]]))
        rows.append(row)
    notes = (
        f"\n\n{result.reps} reps, {result.threads} threads; t/s as median (min–max)"
        + ("; ratios are medians of pair-by-pair ratios, runs interleaved A B A B" if len(models) > 1 else "")
        + "."
    )
    return markdown_table(header, rows) + notes


def compare_markdown(result: CompareResult) -> str:
    """The before/after table of ``compare`` and ``demo``."""
    base, pruned, kld = result.divergence.base, result.divergence.other, result.divergence
    fa = fa_label(result.flash_attn)
    header = ["measure", "base", "pruned", "pruned / base"]
    sizes = result.file_bytes
    rows = [
        ["file size", mib(sizes["base"]), mib(sizes["pruned"]), ratio(sizes["pruned"], sizes["base"])],
        [
            f"PPL, {result.text_label}, ctx {base.ctx}, {base.chunks} chunks ({base.tokens_scored} tokens), {fa}",
            f"{base.ppl:.4f} ± {base.ppl_stderr:.4f}",
            f"{pruned.ppl:.4f} ± {pruned.ppl_stderr:.4f}",
            ratio(pruned.ppl, base.ppl),
        ],
        ["KLD (pruned from base), mean ± se", "", f"{kld.kld_mean:.5f} ± {kld.kld_stderr:.5f}", ""],
        ["KLD 99th percentile", "", f"{kld.kld_p99:.5f}", ""],
        ["top-1 agreement with base", "", f"{100 * kld.top1_agreement:.2f}%", ""],
    ]
    cost = result.attention_cost
    if cost["base"] and cost["pruned"]:
        rows.append(["attention layers", attention_layer_kinds(cost["base"]), attention_layer_kinds(cost["pruned"]), ""])
        for key, label in ATTENTION_COST_LABELS:
            before, after = cost["base"]["per_token"][key], cost["pruned"]["per_token"][key]
            rows.append([label, f"{before:,}", f"{after:,}", ratio(after, before)])
    speed = result.speed
    notes = ""
    if speed is not None:
        b, p = speed.models
        for depth in map(str, speed.depths):
            for kind, count in (("pp", speed.prompt), ("tg", speed.gen)):
                rows.append(
                    [
                        f"{kind}{count} t/s @ depth {depth}, {fa}",
                        _spread(speed.tps(kind)[b][depth]),
                        _spread(speed.tps(kind)[p][depth]),
                        f"{speed.ratios[kind][depth]:.3f}×",
                    ]
                )
        rows.append(
            [f"KV cache, {speed.kv_cells[b]} cells, {fa}", mib(speed.kv_bytes[b]), mib(speed.kv_bytes[p]),
             ratio(speed.kv_bytes[p], speed.kv_bytes[b])]
        )
        rows.append(["peak RSS", mib(speed.rss_bytes[b]), mib(speed.rss_bytes[p]), ratio(speed.rss_bytes[p], speed.rss_bytes[b])])
        notes = (
            f"\n\nSpeed: {speed.reps} reps, {speed.threads} threads, t/s as median (min–max); "
            "speed ratios are medians of pair-by-pair ratios, runs interleaved base/pruned."
        )
    return markdown_table(header, rows) + notes


def score_markdown(report: ScoreReport) -> str:
    """Layer, score, prune rank (1 = removed first; layer 0 is always kept) and a bar scaled to the maximum."""
    rank = {layer: position for position, layer in enumerate(report.prune_order, start=1)}
    top = max((entry.score for entry in report.layers), default=0.0) or 1.0
    rows = []
    for entry in report.layers:
        bar = "█" * max(1, round(BAR_WIDTH * entry.score / top)) if entry.score > 0 else ""
        rows.append([str(entry.layer), f"{entry.score:.6g}", str(rank.get(entry.layer, "kept")), bar])
    return markdown_table(["layer", "score", "prune rank", "coupling"], rows) + "\n"


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
