"""Prune to a budget instead of a count: the fewest layers that reach a predicted speedup at a context depth
or fit the KV cache of N tokens into a size, or the most layers whose held-out KLD stays within a limit.

Layers are taken as the data-free default takes them: for each K tried, ``plan(K)`` is the self-calibrated
pipeline's choice (which layers, which patched). Speed comes from ``speedmodel`` (measured once per model,
CPU, threads and depth), KV bytes from the geometry, the KLD from the pipeline's own held-out guard.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import GatenormError
from .harness.model import check_training_context, default_threads
from .sources import GGUFFile
from .sources.geometry import gguf_geometry
from .speedmodel import (
    SPEED_SETTINGS, SpeedModel, cached_speed_model, deepest_depth, kv_bytes, measure_speed_model, predicted,
)

if TYPE_CHECKING:
    from .selfprune import SelfPruneReport

    Plan = Callable[[int], tuple[SelfPruneReport, dict[int, np.ndarray]]]

METRICS = ("tg", "pp")
DEFAULT_DEPTH = 4096
SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8G', '8GiB', '512M', '1000000' -> bytes (binary multiples: K = 1024)."""
    match = SIZE.match(text)
    if not match:
        raise GatenormError(f"--kv-budget takes a size such as 512M or 8GiB, not {text!r}")
    power = " KMGT".index(match[2].upper() or " ")
    return int(float(match[1]) * 1024**power)


@dataclass(frozen=True)
class Budget:
    """What the user asked for instead of a count: one of speedup, KV size or KLD."""

    speedup: float | None = None
    depth: int = DEFAULT_DEPTH
    metric: str = "tg"
    kv_budget: int | None = None
    ctx: int | None = None
    max_kld: float | None = None
    threads: int | None = None

    def check(self, path: Path) -> None:
        """One-line errors for a budget that cannot be asked of this model, before any work."""
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
            most = gguf_geometry(path).n_layers - 2
            floor = kv_bytes(path, self.ctx, range(1, most + 1))
            if floor > self.kv_budget:
                raise GatenormError(
                    f"--kv-budget {self.kv_budget:,} bytes is out of reach at --ctx {self.ctx}: the smallest KV "
                    f"cache, with {most} layers removed, is {floor:,} bytes"
                )
        if self.max_kld is not None and self.max_kld <= 0:
            raise GatenormError(f"--max-kld must be positive, not {self.max_kld}")

    def speed_model(self, path: Path, progress: bool) -> SpeedModel | None:
        """For --speedup: this CPU's speed model, after checking the target can be reached. Any model measured
        earlier for this file, CPU, threads and FA mode at this depth serves; else it is measured now."""
        if self.speedup is None:
            return None
        threads = self.threads or default_threads()
        speed = cached_speed_model(path, threads, True, [self.depth])
        if speed is None:
            settings = dataclasses.replace(SPEED_SETTINGS, depths=(self.depth,), threads=threads)
            speed = measure_speed_model(path, settings, progress=progress)
        most = gguf_geometry(path).n_layers - 2
        best = speed.speedup(self.metric, self.depth, most, 0)
        if best < self.speedup:
            raise GatenormError(
                f"--speedup {self.speedup} is out of reach: removing {most} layers is predicted to give "
                f"{best:.3f}x {self.metric} at depth {self.depth} on this CPU"
            )
        return speed


def prediction(path: Path, speed: SpeedModel | None, depth: int, report: SelfPruneReport) -> dict[str, Any]:
    """The ``--json`` ``predicted`` entry for a planned layer set."""
    dropped, patched = len(report.layers) - len(report.patched), len(report.patched)
    entry: dict[str, Any] = {"depth": depth}
    if speed is not None:
        entry |= predicted(speed, depth, dropped, patched)
    return entry | {"kv_bytes": kv_bytes(path, depth, report.layers)}


def plan_to_budget(
    path: Path, budget: Budget, plan: Plan, speed: SpeedModel | None
) -> tuple[SelfPruneReport, dict[int, np.ndarray], dict[str, Any]]:
    """The plan that meets ``budget`` with the fewest (speed, KV) or most (KLD) layers, and its prediction."""
    n_layers = gguf_geometry(path).n_layers
    most = n_layers - 2
    if speed is not None:
        k = next(k for k in range(1, most + 1) if speed.speedup(budget.metric, budget.depth, k, 0) >= budget.speedup)
        while True:
            report, patches = plan(k)
            entry = prediction(path, speed, budget.depth, report)
            if entry[f"{budget.metric}_speedup"] >= budget.speedup:
                return report, patches, entry
            if k == most:
                raise GatenormError(
                    f"--speedup {budget.speedup} is out of reach with the default's patches: {most} layers are "
                    f"predicted to give {entry[f'{budget.metric}_speedup']:.3f}x; try --mode drop"
                )
            k += 1
    if budget.kv_budget is not None:
        full = kv_bytes(path, budget.ctx, [])
        per_layer = (full - kv_bytes(path, budget.ctx, range(1, most + 1))) / most
        k = max(1, int(np.ceil((full - budget.kv_budget) / per_layer)))
        while True:
            report, patches = plan(k)
            entry = prediction(path, None, budget.ctx, report)
            if entry["kv_bytes"] <= budget.kv_budget or k == most:
                return report, patches, entry
            k += 1
    kept: tuple[SelfPruneReport, dict[int, np.ndarray]] | None = None
    for k in range(1, most + 1):
        report, patches = plan(k)
        if min(candidate.kld for candidate in report.candidates) > budget.max_kld:
            break
        kept = report, patches
    if kept is None:
        raise GatenormError(
            f"--max-kld {budget.max_kld} is out of reach: removing one layer already gives a held-out KLD of "
            f"{min(c.kld for c in report.candidates):.4f}"
        )
    return kept[0], kept[1], prediction(path, None, budget.depth, kept[0])
