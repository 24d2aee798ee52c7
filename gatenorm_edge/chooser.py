"""What ``prune`` changes, chosen above both pipelines: layers dropped or patched (``selfprune``, the data-free
default, written as deci) or windowed (``windows``, written as granite_swa), for a count or for a budget
(``budget``). The only module that knows both pipelines; neither knows budgets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .budget import Budget, Template, plan_to_budget
from .errors import GatenormError
from .harness.selfcal import CalibrationSpec
from .options import DEFAULT_CACHE_TYPE
from .rewrite import PruneResult, check_output_path, window_gguf
from .selfprune import SelfCalibratedPruner, SelfPruneReport, check_count, check_self_calibrated, write_plan
from .sources.geometry import gguf_geometry
from .speedmodel import Change
from .window_plan import plan_window
from .windows import WindowChooser, WindowReport

WINDOW = "window"


def template(mode: str, window: int | None, cache_type: str) -> Template:
    """A change of k layers before a plan says which: the first k removable (drop, patch) or windowable ones."""
    if mode == WINDOW:
        return lambda k: Change(windowed=tuple(range(1, k + 1)), window=window, cache_type=cache_type)
    return lambda k: Change(dropped=tuple(range(1, k + 1)), cache_type=cache_type)


def most_layers(mode: str, n_layers: int) -> int:
    """How many layers the mode can change: windows leave layer 0 full; drops also keep one more layer."""
    return n_layers - 1 if mode == WINDOW else n_layers - 2


def prune_model(
    src: Path,
    dst: Path,
    *,
    mode: str,
    count: int | None = None,
    budget: Budget | None = None,
    window: int | None = None,
    calib: Path | None = None,
    fixed: Sequence[int] | None = None,
    spec: CalibrationSpec = CalibrationSpec(),
    force: bool = False,
    n_threads: int | None = None,
    progress: bool = False,
) -> tuple[PruneResult, SelfPruneReport | WindowReport, str | None]:
    """Plan and write ``dst`` for ``count`` layers or ``budget``: ``mode`` auto (patches where they help), drop or
    window. Everything that can be refused is refused before any sampling. The third value is a line to print
    when a quantized KV cache alone meets the budget."""
    src, dst = Path(src), Path(dst)
    if mode == WINDOW:
        if calib is not None or fixed is not None:
            raise GatenormError("--mode window chooses its layers on the model's own samples: no --calib or --layers")
        if window is None:
            raise GatenormError("--mode window needs --window W: how many recent tokens a windowed layer sees")
        if not src.is_file():
            raise GatenormError(f"{src}: no such file")
        check_output_path(src, dst, force)
        plan_window(src, [1], window)  # refuses a source, or a window, granite_swa cannot take
    else:
        check_self_calibrated(src, dst, force)
    n_layers = gguf_geometry(src).n_layers
    most = most_layers(mode, n_layers)
    cache_type = budget.cache_type if budget is not None else DEFAULT_CACHE_TYPE
    changes = template(mode, window, cache_type)
    speed = note = None
    if budget is None:
        if mode == WINDOW and not 1 <= (count or 0) <= most:
            raise GatenormError(f"--count must be between 1 and {most} for windows (layer 0 keeps full attention), not {count}")
        if mode != WINDOW:
            check_count(count, n_layers)
    else:
        budget.check(src, most, changes)
        speed = budget.speed_model(src, most, changes, progress)
        note = budget.cache_alone(src, speed)
    planner, plan = _planner(src, mode, window, calib, fixed, spec, n_threads, progress)
    with contextlib.closing(planner):
        if budget is None:
            report = plan(count)
        else:
            report, report.predicted = plan_to_budget(src, budget, plan, speed, most, changes)
        if mode == WINDOW:
            result = window_gguf(src, dst, report.layers, window, planner.sinks, force=force,
                                 provenance=report.provenance(), progress=progress)
        else:
            result = write_plan(src, dst, report, force=force, progress=progress)
    return result, report, note


def _planner(
    src: Path, mode: str, window: int | None, calib: Path | None, fixed: Sequence[int] | None, spec: CalibrationSpec,
    n_threads: int | None, progress: bool,
) -> tuple[Any, Callable[[int], Any]]:
    """The pipeline for ``mode`` (still to be closed) and its plan-for-K function."""
    if mode == WINDOW:
        chooser = WindowChooser(src, window, spec=spec, n_threads=n_threads, progress=progress)
        return chooser, chooser.plan
    pruner = SelfCalibratedPruner(src, calib=calib, spec=spec, recover=mode != "drop", n_threads=n_threads,
                                  progress=progress)
    return pruner, lambda k: pruner.plan(k, fixed=fixed)
