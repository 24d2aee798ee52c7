"""Reports for people and machines: Markdown tables and JSON files, written atomically (plots: ``plots``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any


from .fileio import write_text_atomic
from .options import DATA_DRIVEN, DEFAULT_CACHE_TYPE

if TYPE_CHECKING:
    from .frontier import FrontierResult
    from .harness.compare import CompareResult
    from .harness.passkey import PasskeyResult
    from .harness.perplexity import PerplexityResult
    from .harness.speed import BenchResult, Spread
    from .harness.zeroshot.report import ZeroShotReport, ZeroShotRow
    from .inspection import AttentionCost, Inspection
    from .rewrite import PruneResult
    from .scoring import ScoreReport
    from .study import StudyResult

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


def key_value_table(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column table of labelled values."""
    return markdown_table(["", ""], [[key, str(value)] for key, value in rows])


def megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.2f} MB"


def prune_markdown(result: PruneResult, model: Path, out: Path, details: Sequence[tuple[str, Any]]) -> str:
    """What ``prune`` wrote, then the ``details`` of how it chose and patched."""
    if result.windowed_layers:
        layers = [("windowed layers", f"{', '.join(map(str, result.windowed_layers))} (window {result.window} tokens)")]
    else:
        layers = [("attention-free layers", ", ".join(map(str, result.layers_pruned)) or "none"),
                  ("linear-attention layers", ", ".join(map(str, result.linear_layers)) or "none")]
    return key_value_table([
        ("input", f"{model} ({result.architecture}, {result.n_layers} layers)"),
        ("output", f"{out} ({result.target})"),
        *layers,
        ("size", f"{megabytes(result.bytes_in)} -> {megabytes(result.bytes_out)}"),
        ("dropped tensors", f"{len(result.dropped_tensors)} ({megabytes(result.dropped_bytes)})"),
        ("Q/K tensors reordered for RoPE", len(result.permuted_tensors)),
        *details,
    ])


def inspect_markdown(info: Inspection) -> str:
    """``inspect``'s description table, then the tensor types."""
    rows: list[tuple[str, Any]] = [
        ("file", info.file),
        ("architecture", info.architecture),
        ("layers", info.n_layers),
        ("attention-free layers", ", ".join(map(str, info.attention_free_layers)) or "none"),
        *([("windowed layers", f"{', '.join(map(str, info.windowed_layers))} (window {info.window} tokens)")]
          if info.windowed_layers else []),
        ("size", megabytes(info.size_bytes)),
        ("tensors", info.n_tensors),
    ]
    rows += [(f"gatenorm.{key}", value) for key, value in info.gatenorm.items()]
    cost = info.attention_cost
    if cost is not None:
        rows.append(("attention layers", attention_layer_kinds(cost)))
        rows += [(label, f"{getattr(cost, key):,}") for key, label in ATTENTION_COST_LABELS]
    types = markdown_table(
        ["tensor type", "count", "bytes"],
        [[name, str(entry["count"]), str(entry["bytes"])] for name, entry in info.tensor_types.items()],
    )
    return key_value_table(rows) + "\n\n" + types


def mib(n_bytes: int | None) -> str:
    return "n/a" if n_bytes is None else f"{n_bytes / 2**20:.2f} MiB"


def fa_label(flash_attn: bool, cache_type: str = DEFAULT_CACHE_TYPE) -> str:
    """'FA on', or with a KV cache other than llama.cpp's default F16, 'FA on, KV q8_0'."""
    return ("FA on" if flash_attn else "FA off") + ("" if cache_type == DEFAULT_CACHE_TYPE else f", KV {cache_type}")


def ratio(after: float | None, before: float | None) -> str:
    return "" if not after or not before else f"{after / before:.3f}×"


ATTENTION_COST_LABELS = (
    ("flops", "attention FLOPs/token (matrices)"),
    ("flops_per_context_token", "attention FLOPs/token per cached token"),
    ("weight_bytes", "attention weight bytes/token"),
    ("kv_bytes", "KV-cache bytes/token (F16)"),
)


def attention_layer_kinds(cost: AttentionCost) -> str:
    """'26 attention, 2 linear, 2 free' (and ', 4 windowed' where there are)."""
    windowed = f", {len(cost.windowed)} windowed" if cost.windowed else ""
    return f"{len(cost.attention)} attention, {len(cost.linear)} linear, {len(cost.free)} free{windowed}"


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
        fa_label(result.flash_attn, result.cache_type),
        f"{result.seconds:.1f}",
    ]
    return markdown_table(header, [row])


def _spread(cell: Spread) -> str:
    return f"{cell.median:.1f} ({cell.min:.1f}–{cell.max:.1f})"


def _predicted(result: BenchResult, kind: str, depth: str) -> str:
    return "" if result.predicted is None else f" (predicted {result.predicted[kind][depth]:.3f}×)"


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
                row.append(f"{result.ratios[kind][depth]:.3f}×" + _predicted(result, kind, depth))
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
        f"\n\n{result.reps} reps"
        + (f" in each of {result.processes} fresh sets of processes" if result.processes > 1 else "")
        + f", {result.threads} threads; t/s as median (min–max)"
        + ("; ratios are medians of pair-by-pair ratios, runs interleaved A B A B" if len(models) > 1 else "")
        + "."
    )
    return markdown_table(header, rows) + notes


def compare_markdown(result: CompareResult) -> str:
    """The before/after table of ``compare`` and ``demo``."""
    base, pruned, kld = result.divergence.base, result.divergence.other, result.divergence
    fa = fa_label(result.flash_attn, result.cache_type)
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
    base_cost, pruned_cost = result.base_cost, result.pruned_cost
    if base_cost is not None and pruned_cost is not None:
        rows.append(["attention layers", attention_layer_kinds(base_cost), attention_layer_kinds(pruned_cost), ""])
        for key, label in ATTENTION_COST_LABELS:
            before, after = getattr(base_cost, key), getattr(pruned_cost, key)
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
                        f"{speed.ratios[kind][depth]:.3f}×" + _predicted(speed, kind, depth),
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
    for entry in result.long_context or []:
        b, p, d = entry.divergence.base, entry.divergence.other, entry.divergence
        rows += [
            [f"PPL, {result.text_label}, ctx {entry.ctx}, {b.chunks} chunks ({b.tokens_scored} tokens), {fa}",
             f"{b.ppl:.4f} ± {b.ppl_stderr:.4f}", f"{p.ppl:.4f} ± {p.ppl_stderr:.4f}", ratio(p.ppl, b.ppl)],
            [f"KLD at ctx {entry.ctx}, mean ± se", "", f"{d.kld_mean:.5f} ± {d.kld_stderr:.5f}", ""],
            [f"pass-key retrieval, ctx {entry.ctx}, {entry.base_passkey.trials} trials",
             f"{100 * entry.base_passkey.accuracy:.0f}%", f"{100 * entry.pruned_passkey.accuracy:.0f}%", ""],
        ]
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


# --------------------------------------------------------------------------------------------
# zero-shot


def _pm(value: float | None, error: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f} ± {error:.4f}" if error is not None else f"{value:.4f}"


def passkey_markdown(result: PasskeyResult) -> str:
    """Pass-key accuracy per depth and overall, with the prompt length and FA mode."""
    rows = [[f"{100 * position:.0f}%", str(n), f"{100 * accuracy:.0f}%"] for position, accuracy, n in result.by_position()]
    rows.append(["all", str(result.trials), f"**{100 * result.accuracy:.0f}%**"])
    title = (
        f"Pass-key retrieval, {Path(result.model).name}: prompts of up to {result.prompt_tokens} tokens "
        f"(ctx {result.ctx}), greedy answers, exact match; {fa_label(result.flash_attn, result.cache_type)}, {result.seconds:.0f} s\n\n"
    )
    return title + markdown_table(["key depth", "trials", "accuracy"], rows)


def zeroshot_markdown_rows(rows: Sequence[ZeroShotRow]) -> list[list[str]]:
    """``zeroshot_table`` rows as cells for a (measure, base, pruned, pruned / base) Markdown table."""
    return [
        [f"{row.measure} (n={row.n})", _pm(row.base, row.base_stderr),
         _pm(row.pruned, row.pruned_stderr), f"{row.pruned / row.base:.3f}×" if row.base else ""]
        for row in rows
    ]


def zeroshot_comparison_markdown(rows: Sequence[ZeroShotRow], limit: int | None = None) -> str:
    """The before-vs-after zero-shot table (``compare --zeroshot``, ``tools/zeroshot_table.py``)."""
    title = "zero-shot (lm-eval prompts)" + (f", --limit {limit}" if limit is not None else "")
    return markdown_table([title, "base", "pruned", "pruned / base"], zeroshot_markdown_rows(rows))


def zeroshot_markdown(report: ZeroShotReport) -> str:
    """A Markdown table: task, n, acc ± stderr, acc_norm ± stderr, CPU minutes; then the averages."""
    lines = ["| task | n | acc | acc_norm | CPU min |", "|---|---:|---:|---:|---:|"]
    for task in report.tasks:
        lines.append(
            f"| {task.task} | {task.n} | {_pm(task.acc, task.acc_stderr)} | "
            f"{_pm(task.acc_norm, task.acc_norm_stderr)} | {task.cpu_seconds / 60:.1f} |"
        )
    average, average_stderr = report.average_acc
    best, best_stderr = report.average_best
    cpu = sum(task.cpu_seconds for task in report.tasks) / 60
    lines.append(f"| **average** | {sum(t.n for t in report.tasks)} | {_pm(average, average_stderr)} | "
                 f"{_pm(best, best_stderr)}¹ | {cpu:.1f} |")
    lines.append("")
    lines.append("¹ average of acc_norm where the task reports it, acc elsewhere.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the criteria study


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def study_markdown(result: StudyResult) -> str:
    """Tables for people: PPL (KLD) per criterion and count, ranking agreement and cost, and the 10% bar."""
    from .study import BAR, DEFAULT_CRITERION, ORACLE
    ev, cal = result.evaluation, result.calibration
    lines = [
        f"Model {Path(result.model).name} ({result.n_layers} layers); flash attention on; "
        f"evaluation: {ev.chunks} chunks x {ev.ctx} tokens of {Path(ev.text).name} from chunk {ev.first_chunk} "
        f"({result.tokens_scored} tokens scored); base PPL {result.base_ppl:.3f} ± {result.base_ppl_stderr:.3f}.",
    ]
    if cal is not None:
        lines.append(
            f"Calibration (data-driven criteria): {cal.chunks} chunk(s) x {cal.ctx} tokens of "
            f"{Path(cal.text).name} from chunk {cal.first_chunk}."
        )
    header = "| criterion | scoring s | ρ vs loo-ppl | " + " | ".join(f"k={k} PPL (KLD)" for k in result.counts) + " |"
    lines += ["", header, "|---|" + "---:|" * (2 + len(result.counts))]
    for study in result.criteria:
        cells = [f"{p.ppl:.3f} ({p.kld:.3f})" for p in study.points]
        lines.append(
            f"| {study.ranking.criterion} | {study.ranking.seconds:.3g} | {_cell(study.spearman_vs_loo_ppl)} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "| criterion | prune order (first " + str(max(result.counts)) + ") |", "|---|---|"]
    for study in result.criteria:
        lines.append(f"| {study.ranking.criterion} | {', '.join(map(str, study.ranking.prune_order[: max(result.counts)]))} |")
    oracle = result.criterion(ORACLE)
    data_free = [s for s in result.criteria if s.ranking.criterion not in DATA_DRIVEN]
    if oracle and data_free:
        lines += ["", f"PPL relative to {ORACLE} (the bar: within {BAR:.0%} at every k):", ""]
        lines.append("| criterion | " + " | ".join(f"k={k}" for k in result.counts) + " | within bar |")
        lines.append("|---|" + "---:|" * len(result.counts) + "---|")
        for study in data_free:
            ratios = [p.ppl / o.ppl - 1 for p, o in zip(study.points, oracle.points)]
            within = all(p.ppl <= (1 + BAR) * o.ppl for p, o in zip(study.points, oracle.points))
            verdict = "yes" if within else f"no (worst {max(ratios):+.1%})"
            name = study.ranking.criterion + (" (default)" if study.ranking.criterion == DEFAULT_CRITERION else "")
            lines.append(f"| {name} | " + " | ".join(f"{r:+.1%}" for r in ratios) + f" | {verdict} |")
    lines.append("")
    lines.append(f"{result.models_evaluated} pruned models evaluated; study took {result.seconds:.0f} s.")
    return "\n".join(lines) + "\n"


def frontier_markdown(result: FrontierResult) -> str:
    """Every variant by tg speedup: its PPL (± stderr, tokens) and ratios to the base with an F16 cache;
    the Pareto frontier marked."""
    rows = []
    for point in sorted(result.points, key=lambda p: (p.tg_speedup, -p.ppl_ratio)):
        rows.append([
            ("**" + point.variant.name + "**") if point.frontier else point.variant.name,
            f"{point.tg:.2f}", f"{point.tg_speedup:.3f}×", f"{point.pp_speedup:.3f}×",
            f"{point.ppl:.3f} ± {point.ppl_stderr:.3f}", f"{point.ppl_ratio:.3f}×",
        ])
    header = ["variant (bold: on the frontier)", f"tg t/s @ d{result.depth}", "tg speedup", "pp speedup",
              f"PPL, ctx {result.ctx}, {result.points[0].tokens} tokens", "PPL ÷ base"]
    notes = (f"\n\n{Path(result.text).name}, {result.chunks} chunks of {result.ctx} tokens; speed: every variant in one "
             f"interleaved run, FA on, {result.threads} threads, medians of round-by-round ratios over the base with "
             f"llama.cpp's default F16 KV cache; windows of {result.window} tokens.")
    return markdown_table(header, rows) + notes
