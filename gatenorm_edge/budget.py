"""Prune to a budget instead of a count: the fewest layers that reach a predicted speedup at a context depth
or fit the KV cache of N tokens into a size, or the most layers whose held-out KLD stays within a limit.

Layers are taken in a planner's order: for each K tried, ``plan(K)`` is the chosen pipeline's plan (the data-free
default's layers, dropped or patched, or the windowed layers of ``prune --mode window``). Speed comes from
``speedmodel`` (measured once per model, CPU, threads, KV-cache type, window and depth), KV bytes from the
geometry, the KLD from the pipeline's own held-out check. Every figure is for the KV-cache type the user names;
speedups are over the model with llama.cpp's default F16 cache, so a quantized cache's own gain counts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .errors import GatenormError
from .harness.model import cache_type_fits, check_training_context, default_threads
from .options import DEFAULT_CACHE_TYPE
from .sources import GGUFFile
from .speedmodel import (
    SPEED_SETTINGS, Change, SpeedModel, cached_speed_model, deepest_depth, measure_speed_model, predicted,
)

METRICS = ("tg", "pp")
DEFAULT_DEPTH = 4096
SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
CACHE_FLAGS = {"q8_0": "-ctk q8_0 -ctv q8_0", "q4_0": "-ctk q4_0 -ctv q4_0"}


class Plan(Protocol):
    """What a planner returns for K layers: the change it makes and its KLD on held-out calibration text."""

    def change(self, cache_type: str) -> Change: ...

    @property
    def held_out_kld(self) -> float: ...


P = TypeVar("P", bound=Plan)
Template = Callable[[int], Change]  # a change of k layers, before a plan says which


def parse_size(text: str) -> int:
    """'8G', '8GiB', '512M', '1000000' -> bytes (binary multiples: K = 1024)."""
    match = SIZE.match(text)
    if not match:
        raise GatenormError(f"--kv-budget takes a size such as 512M or 8GiB, not {text!r}")
    power = " KMGT".index(match[2].upper() or " ")
    return int(float(match[1]) * 1024**power)


@dataclass(frozen=True)
class Budget:
    """What the user asked for instead of a count: one of speedup, KV size or KLD, for a KV-cache type."""

    speedup: float | None = None
    depth: int = DEFAULT_DEPTH
    metric: str = "tg"
    kv_budget: int | None = None
    ctx: int | None = None
    max_kld: float | None = None
    threads: int | None = None
    cache_type: str = DEFAULT_CACHE_TYPE

    def check(self, path: Path, most: int, template: Template) -> None:
        """One-line errors for a budget that cannot be asked of this model, before any work; ``template(most)`` is
        the largest change the planner can make."""
        given = [name for name, value in (("--speedup", self.speedup), ("--kv-budget", self.kv_budget),
                                           ("--max-kld", self.max_kld)) if value is not None]
        if len(given) != 1:
            raise GatenormError(f"give one target of --speedup, --kv-budget and --max-kld, not {' and '.join(given)}")
        if self.metric not in METRICS:
            raise GatenormError(f"--metric is tg or pp, not {self.metric!r}")
        if self.speedup is not None:
            if self.speedup <= 1:
                raise GatenormError(f"--speedup must be above 1 (a ratio of tokens/s), not {self.speedup}")
            if self.depth < 0:
                raise GatenormError(f"--depth must be 0 or more tokens, not {self.depth}")
            deepest = deepest_depth(path)
            if deepest is not None and self.depth > deepest:
                raise GatenormError(
                    f"--depth {self.depth} is too deep for {path.name}'s training context of "
                    f"{deepest + SPEED_SETTINGS.prompt} tokens: the speed model times {SPEED_SETTINGS.prompt} tokens "
                    f"after the depth, so --depth can be at most {deepest}"
                )
        if self.kv_budget is not None:
            if self.ctx is None or self.ctx < 1:
                raise GatenormError("--kv-budget needs --ctx N: the number of tokens the KV cache must hold")
            check_training_context(GGUFFile(path), self.ctx, "--ctx")
            floor = template(most).kv_bytes(path, self.ctx)
            if floor > self.kv_budget:
                what = "windowed" if template(most).windowed else "removed"
                raise GatenormError(
                    f"--kv-budget {self.kv_budget:,} bytes is out of reach at --ctx {self.ctx}: the smallest "
                    f"{self.cache_type} KV cache, with {most} layers {what}, is {floor:,} bytes"
                )
        if self.max_kld is not None and self.max_kld <= 0:
            raise GatenormError(f"--max-kld must be positive, not {self.max_kld}")

    def speed_model(self, path: Path, most: int, template: Template, progress: bool) -> SpeedModel | None:
        """For --speedup: this CPU's speed model for the cache type and window, after checking the target can be
        reached. Any model measured earlier for this file, CPU, threads, FA mode, cache type and window at this
        depth serves; else it is measured now."""
        if self.speedup is None:
            return None
        threads = self.threads or default_threads()
        largest = template(most)
        speed = cached_speed_model(path, threads, True, [self.depth], largest)
        if speed is None:
            settings = dataclasses.replace(SPEED_SETTINGS, depths=(self.depth,), threads=threads, cache_type=self.cache_type)
            speed = measure_speed_model(path, settings, window=largest.window, progress=progress)
        best = speed.speedup(self.metric, self.depth, largest)
        if best < self.speedup:
            what = "windowing" if largest.windowed else "removing"
            raise GatenormError(
                f"--speedup {self.speedup} is out of reach: {what} {most} layers is predicted to give "
                f"{best:.3f}x {self.metric} at depth {self.depth} on this CPU with a {self.cache_type} KV cache"
            )
        return speed

    def cache_alone(self, path: Path, speed: SpeedModel | None) -> str | None:
        """A line for when a quantized KV cache, with no layer changed, already meets the target (else None). Its
        perplexity is not known here (a q4_0 cache can wreck a qwen2 model), so the line says how to measure it."""
        for cache_type, flags in CACHE_FLAGS.items():
            unchanged = Change(cache_type=cache_type)
            if not cache_type_fits(path, cache_type):
                continue
            check = f"; check its perplexity first: gatenorm-edge ppl {path.name} --text FILE --cache-type {cache_type}"
            if self.speedup is not None and speed is not None and speed.covers(unchanged):
                gain = speed.speedup(self.metric, self.depth, unchanged)
                if gain >= self.speedup:
                    return (f"note: a {cache_type} KV cache alone is predicted to give {gain:.3f}x {self.metric} at depth "
                            f"{self.depth} on this CPU, no layer changed: run llama.cpp with {flags}{check}")
            if self.kv_budget is not None and self.ctx is not None and unchanged.kv_bytes(path, self.ctx) <= self.kv_budget:
                return (f"note: a {cache_type} KV cache alone fits {self.ctx} tokens in "
                        f"{unchanged.kv_bytes(path, self.ctx):,} bytes, no layer changed: run llama.cpp with {flags}{check}")
        return None


def prediction(path: Path, speed: SpeedModel | None, depth: int, change: Change) -> dict[str, Any]:
    """The ``--json`` ``predicted`` entry for a planned change."""
    entry: dict[str, Any] = {"depth": depth, "cache_type": change.cache_type}
    if speed is not None:
        entry |= predicted(speed, depth, change)
    return entry | {"kv_bytes": change.kv_bytes(path, depth)}


def plan_to_budget(
    path: Path, budget: Budget, plan: Callable[[int], P], speed: SpeedModel | None, most: int, template: Template,
) -> tuple[P, dict[str, Any]]:
    """The plan that meets ``budget`` with the fewest (speed, KV) or most (KLD) layers, and its prediction."""
    if speed is not None:
        goal = budget.speedup
        k = next(k for k in range(1, most + 1) if speed.speedup(budget.metric, budget.depth, template(k)) >= goal)
        while True:
            chosen = plan(k)
            entry = prediction(path, speed, budget.depth, chosen.change(budget.cache_type))
            if entry[f"{budget.metric}_speedup"] >= goal:
                return chosen, entry
            if k == most:
                raise GatenormError(
                    f"--speedup {goal} is out of reach with the default's patches: {most} layers are "
                    f"predicted to give {entry[f'{budget.metric}_speedup']:.3f}x; try --mode drop"
                )
            k += 1
    if budget.kv_budget is not None:
        k = next(k for k in range(1, most + 1) if template(k).kv_bytes(path, budget.ctx) <= budget.kv_budget)
        while True:
            chosen = plan(k)
            entry = prediction(path, None, budget.ctx, chosen.change(budget.cache_type))
            if entry["kv_bytes"] <= budget.kv_budget or k == most:
                return chosen, entry
            k += 1
    kept: P | None = None
    for k in range(1, most + 1):
        chosen = plan(k)
        if chosen.held_out_kld > budget.max_kld:
            break
        kept = chosen
    if kept is None:
        what = "windowing" if template(1).windowed else "removing"
        raise GatenormError(
            f"--max-kld {budget.max_kld} is out of reach: {what} one layer already gives a held-out KLD of "
            f"{chosen.held_out_kld:.4f}"
        )
    return kept, prediction(path, None, budget.depth, kept.change(budget.cache_type))
