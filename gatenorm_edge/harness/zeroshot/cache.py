"""Per-example results on disk: an append-only, locked jsonl per (model, task, data file), so a rerun
with any ``--limit`` reuses what was computed and an interrupted run resumes."""

from __future__ import annotations

import fcntl
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from ...cache import DamagedEntry, report_damage, seal, unseal
from ...errors import GatenormError
from .tasks import Example

RESULTS_VERSION = 1  # bump when prompts or scoring change: old cached results stop matching

@dataclass
class ExampleResult:
    """What is stored per example: its choices' log-likelihoods and the CPU spent on it."""

    index: int
    gold: int
    lls: list[float]
    seconds: float
    cpu_seconds: float


class ResultsFile:
    """Append-only jsonl of sealed ``ExampleResult`` rows (``cache.seal``) for one (model, task, data file),
    locked while open. A row cut short by an interruption, or damaged, is dropped on open and computed again.
    """

    def __init__(self, path: Path, examples: Sequence[Example]) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise GatenormError(f"another run is writing {path}; wait for it or pass another --cache-dir") from None
        self.done: dict[int, ExampleResult] = self._read(examples)

    def _read(self, examples: Sequence[Example]) -> dict[int, ExampleResult]:
        """The file's sound rows. Rows cut short, altered, written by another version or not matching the data
        are dropped from the file (reported in one line) and computed again."""
        self._handle.seek(0)
        lines = self._handle.read().split("\n")
        by_index = {example.index: example for example in examples}
        done: dict[int, ExampleResult] = {}
        damaged: list[str] = []
        for number, line in enumerate(lines[:-1], 1):  # the last piece has no newline: empty, or a row cut short
            try:
                result = ExampleResult(**unseal(line))
            except (DamagedEntry, TypeError) as exc:
                damaged.append(f"row {number}: {exc if isinstance(exc, DamagedEntry) else 'not a result row'}")
                continue
            example = by_index.get(result.index)
            if example is not None and (result.gold != example.gold or len(result.lls) != len(example.requests)):
                damaged.append(f"row {number}: does not match the data")
                continue
            done[result.index] = result
        if lines[-1]:
            damaged.append(f"row {len(lines)}: cut short")
        if damaged:
            report_damage("zero-shot", self.path, f"{len(damaged)} bad row(s), the first {damaged[0]}", "computing those examples again")
            self._handle.seek(0)
            self._handle.truncate()
            for result in done.values():
                self._handle.write(seal(asdict(result)) + "\n")
            self._handle.flush()
        return done

    def add(self, result: ExampleResult) -> None:
        self._handle.write(seal(asdict(result)) + "\n")
        self._handle.flush()
        self.done[result.index] = result

    def close(self) -> None:
        self._handle.close()


def results_path(cache_dir: Path, model_sha: str, model_size: int, task: str, data_sha: str) -> Path:
    return Path(cache_dir) / f"{model_sha[:16]}-{model_size}" / f"{task}-{data_sha[:12]}-v{RESULTS_VERSION}.jsonl"


