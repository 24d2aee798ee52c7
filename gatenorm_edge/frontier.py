"""The trade a user decides from, measured on this machine: generation speed at a context depth against
perplexity, for every lever at once (``gatenorm-edge frontier``).

Variants: the model with each KV-cache type llama.cpp offers (``options.CACHE_TYPES``); for each speedup target,
the file ``prune --speedup X --depth D`` writes (the data-free default: layers dropped or patched) and the one
``prune --mode window --window W --speedup X --depth D`` writes (layers windowed), each run with the default F16
cache and with each quantized ``stack`` cache on top. Every variant's perplexity is measured on the same chunks
of a text, and all variants are benchmarked in one interleaved run (A B C ... A B C ...); speedups are medians
of round-by-round ratios over the model with llama.cpp's default F16 cache. The Pareto frontier is the variants
no other variant beats on both speed and perplexity. Every file (``drop-x{X}.gguf``, ``window-x{X}.gguf``) and
measurement (``ppl{ctx}-{cache type}-{base or file stem}.json``, ``bench-d{depth}.json``) is kept in ``out`` and
reused when it was made for the same text, chunks and variants, so an interrupted run resumes (and the files
and perplexities of ``tools/window_study.py``, which uses the same names, are reused).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .budget import Budget
from .chooser import WINDOW, prune_model
from .fileio import write_text_atomic
from .harness.model import cache_type_fits
from .harness.perplexity import perplexity
from .harness.speed import BenchSettings, bench, paired_ratio
from .options import AUTO, CACHE_TYPES, DEFAULT_CACHE_TYPE
from .progress import progress_bar


@dataclass(frozen=True)
class Variant:
    """One point of the frontier: a file, the KV-cache type it runs with, and what it is."""

    name: str
    path: str
    cache_type: str
    kind: str  # base, drop (the data-free default), window
    target: float | None = None


@dataclass
class Point:
    """A variant's measurements: PPL on the text and tg/pp at the depth, with their ratios to the base's."""

    variant: Variant
    ppl: float
    ppl_stderr: float
    tokens: int
    tg: float
    pp: float
    tg_speedup: float
    pp_speedup: float
    ppl_ratio: float
    frontier: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FrontierResult:
    """``frontier --json``: the settings and every point, the base with an F16 cache first."""

    model: str
    text: str
    ctx: int
    chunks: int
    depth: int
    window: int
    threads: int
    points: list[Point]
    bench: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "points"} | {
            "points": [point.to_dict() for point in self.points]
        }


def cached_json(path: Path, compute: Callable[[], dict[str, Any]],
                keep: Callable[[dict[str, Any]], bool] = lambda stored: True) -> dict[str, Any]:
    """The JSON at ``path``, computed and written atomically when missing (or when ``keep`` rejects what is
    there: made for other settings): a rerun resumes."""
    if not path.is_file() or not keep(json.loads(path.read_text())):
        write_text_atomic(path, json.dumps(compute(), indent=1) + "\n")
    return json.loads(path.read_text())


def variants(model: Path, out: Path, targets: Sequence[float], depth: int, window: int, stack: Sequence[str],
             threads: int | None, progress: bool) -> list[Variant]:
    """The model with every cache type it takes, then each target's drop and window files with F16 and ``stack``."""
    found = [Variant(f"base {ct}", str(model), ct, "base") for ct in CACHE_TYPES if cache_type_fits(model, ct)]
    for kind, mode in (("drop", AUTO), ("window", WINDOW)):
        for target in targets:
            path = out / f"{kind}-x{target}.gguf"
            if not path.is_file():
                prune_model(model, path, mode=mode, budget=Budget(speedup=target, depth=depth, threads=threads),
                            window=window if mode == WINDOW else None, n_threads=threads, progress=progress)
            for cache_type in (DEFAULT_CACHE_TYPE, *stack):
                if cache_type_fits(model, cache_type):
                    found.append(Variant(f"{kind} {target}x {cache_type}", str(path), cache_type, kind, target))
    return found


def pareto(points: list[Point]) -> None:
    """Mark the points no other point beats on both tg speedup and PPL ratio."""
    for point in points:
        point.frontier = not any(
            other.tg_speedup >= point.tg_speedup and other.ppl_ratio <= point.ppl_ratio
            and (other.tg_speedup, other.ppl_ratio) != (point.tg_speedup, point.ppl_ratio)
            for other in points
        )


def frontier(
    model: Path, text: Path, out: Path, *, targets: Sequence[float] = (1.1, 1.2, 1.3), depth: int = 4096,
    window: int = 512, ctx: int = 4096, chunks: int = 5, stack: Sequence[str] = ("q8_0",),
    settings: BenchSettings | None = None, threads: int | None = None, progress: bool = False,
) -> FrontierResult:
    """Make, measure and rank every variant (see the module's description); files and figures live in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    found = variants(model, out, targets, depth, window, stack, threads, progress)
    ppl = {}
    with progress_bar("perplexity of each variant", len(found), progress) as tick:
        for variant in found:
            stem = "base" if variant.kind == "base" else Path(variant.path).stem
            ppl[variant.name] = cached_json(
                out / f"ppl{ctx}-{variant.cache_type}-{stem}.json",
                lambda: perplexity(variant.path, text, ctx=ctx, chunks=chunks, n_threads=threads,
                                   cache_type=variant.cache_type).to_dict(),
                lambda stored: (stored["text"], stored["chunks"]) == (str(text), chunks),
            )
            tick(status=f"{variant.name}: {ppl[variant.name]['ppl']:.3f}")
    settings = settings or BenchSettings(prompt=256, gen=32, depths=(depth,), reps=3, threads=threads)
    measured = cached_json(
        out / f"bench-d{depth}.json",
        lambda: bench([v.path for v in found], settings, progress=progress, cache_types=[v.cache_type for v in found]).to_dict(),
        lambda stored: stored["paths"] == [v.path for v in found] and stored["reps"] == settings.reps,
    )
    labels = measured["models"]
    base_label, base_ppl = labels[0], ppl[found[0].name]["ppl"]
    points = []
    for variant, label in zip(found, labels):
        rates = {kind: measured[f"{kind}_tps"] for kind in ("tg", "pp")}
        ratio = {kind: paired_ratio(rates[kind][label][str(depth)]["samples"], rates[kind][base_label][str(depth)]["samples"])
                 for kind in ("tg", "pp")}
        figures = ppl[variant.name]
        points.append(Point(variant, figures["ppl"], figures["ppl_stderr"], figures["tokens_scored"],
                            rates["tg"][label][str(depth)]["median"], rates["pp"][label][str(depth)]["median"],
                            ratio["tg"], ratio["pp"], figures["ppl"] / base_ppl))
    pareto(points)
    return FrontierResult(str(model), str(text), ctx, chunks, depth, window, measured["threads"], points, measured)
