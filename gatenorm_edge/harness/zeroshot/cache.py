"""Per-example results on disk: an append-only, locked jsonl per (model, task, data file), so a rerun
with any ``--limit`` reuses what was computed and an interrupted run resumes."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

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
    """Append-only jsonl of ``ExampleResult`` rows for one (model, task, data file), locked while open.

    A row cut short by an interruption is dropped on open; rows that do not match the data are an error.
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
        self._handle.seek(0)
        text = self._handle.read()
        complete = text[: text.rfind("\n") + 1]
        if len(complete) != len(text):
            self._handle.truncate(len(complete.encode("utf-8")))
        by_index = {example.index: example for example in examples}
        done = {}
        for number, line in enumerate(complete.splitlines(), 1):
            try:
                result = ExampleResult(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                raise GatenormError(f"{self.path}:{number}: not a result row; delete the file to recompute") from None
            example = by_index.get(result.index)
            if example is not None and (result.gold != example.gold or len(result.lls) != len(example.requests)):
                raise GatenormError(f"{self.path}:{number}: does not match the data; delete the file to recompute")
            done[result.index] = result
        return done

    def add(self, result: ExampleResult) -> None:
        self._handle.write(json.dumps(asdict(result)) + "\n")
        self._handle.flush()
        self.done[result.index] = result

    def close(self) -> None:
        self._handle.close()


def results_path(cache_dir: Path, model_sha: str, model_size: int, task: str, data_sha: str) -> Path:
    return Path(cache_dir) / f"{model_sha[:16]}-{model_size}" / f"{task}-{data_sha[:12]}-v{RESULTS_VERSION}.jsonl"


