"""Zero-shot results as lm-eval reports them: acc and acc_norm with stderr per task, their average, the
Markdown table, and the before-vs-after rows of ``compare --zeroshot``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from ..logprobs import stderr_of_mean
from .cache import ExampleResult
from .tasks import TASKS, Example

def is_correct(lls: Sequence[float], gold: int, lengths: Sequence[int] | None = None) -> bool:
    """Whether the highest (length-normalised, when lengths are given) log-likelihood is the gold choice."""
    scores = np.asarray(lls, dtype=np.float64)
    if lengths is not None:
        scores = scores / np.asarray(lengths, dtype=np.float64)
    return int(np.argmax(scores)) == gold


@dataclass
class TaskResult:
    """One task's accuracy; ``acc_norm`` is None where lm-eval does not report it."""

    task: str
    n: int
    acc: float
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    seconds: float
    cpu_seconds: float
    reused: int
    results_file: str

    @classmethod
    def from_results(
        cls, task: str, examples: Sequence[Example], done: dict[int, ExampleResult], reused: int, path: Path
    ) -> TaskResult:
        rows = [done[example.index] for example in examples]
        acc = [float(is_correct(row.lls, example.gold)) for row, example in zip(rows, examples)]
        norm = [float(is_correct(row.lls, ex.gold, ex.lengths)) for row, ex in zip(rows, examples)]
        normalised = TASKS[task].normalised
        return cls(
            task=task,
            n=len(rows),
            acc=float(np.mean(acc)),
            acc_stderr=stderr_of_mean(acc),
            acc_norm=float(np.mean(norm)) if normalised else None,
            acc_norm_stderr=stderr_of_mean(norm) if normalised else None,
            seconds=sum(row.seconds for row in rows),
            cpu_seconds=sum(row.cpu_seconds for row in rows),
            reused=reused,
            results_file=str(path),
        )


def _average(values: Sequence[float], errors: Sequence[float | None]) -> tuple[float, float | None]:
    """Mean of task scores and its stderr (tasks independent: sqrt(sum of squared stderrs) / k)."""
    if any(error is None for error in errors):
        return float(np.mean(values)), None
    return float(np.mean(values)), math.sqrt(sum(error**2 for error in errors)) / len(errors)  # type: ignore[operator]


@dataclass
class ZeroShotReport:
    """Accuracy of one model on several tasks; ``to_dict`` is the ``zeroshot --json`` contract."""

    model: str
    model_sha256: str
    data_dir: str
    limit: int | None
    flash_attn: bool
    n_threads: int
    tasks: list[TaskResult] = field(default_factory=list)

    @property
    def average_acc(self) -> tuple[float, float | None]:
        return _average([t.acc for t in self.tasks], [t.acc_stderr for t in self.tasks])

    @property
    def average_best(self) -> tuple[float, float | None]:
        """Average of acc_norm where the task reports it and acc elsewhere (the usual paper column)."""
        pairs = [(t.acc_norm, t.acc_norm_stderr) if t.acc_norm is not None else (t.acc, t.acc_stderr) for t in self.tasks]
        return _average([value for value, _ in pairs], [error for _, error in pairs])

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ZeroShotReport:
        """The report back from its ``zeroshot --json`` form (the averages are recomputed, not read)."""
        scalars = {f.name: data[f.name] for f in fields(cls) if f.name != "tasks"}
        return cls(**scalars, tasks=[TaskResult(**task) for task in data["tasks"]])

    def to_dict(self) -> dict[str, Any]:
        average, average_stderr = self.average_acc
        best, best_stderr = self.average_best
        return {
            "model": self.model,
            "model_sha256": self.model_sha256,
            "data_dir": self.data_dir,
            "limit": self.limit,
            "flash_attn": self.flash_attn,
            "n_threads": self.n_threads,
            "tasks": [asdict(task) for task in self.tasks],
            "average": {
                "acc": average,
                "acc_stderr": average_stderr,
                "acc_norm_or_acc": best,
                "acc_norm_or_acc_stderr": best_stderr,
            },
        }


@dataclass
class ZeroShotRow:
    """One line of a before-vs-after zero-shot table: a task's headline metric (or the average) for both."""

    measure: str
    n: int
    base: float | None
    base_stderr: float | None
    pruned: float | None
    pruned_stderr: float | None


def before_after_rows(before: ZeroShotReport, after: ZeroShotReport) -> list[ZeroShotRow]:
    """One row per task (acc_norm where lm-eval reports it, acc elsewhere), then the average of those."""
    if [t.task for t in before.tasks] != [t.task for t in after.tasks]:
        raise ValueError("the two reports cover different tasks")
    rows = []
    for base, pruned in zip(before.tasks, after.tasks):
        metric = "acc_norm" if base.acc_norm is not None else "acc"
        rows.append(ZeroShotRow(
            measure=f"{base.task} {metric}",
            n=base.n,
            base=getattr(base, metric),
            base_stderr=getattr(base, f"{metric}_stderr"),
            pruned=getattr(pruned, metric),
            pruned_stderr=getattr(pruned, f"{metric}_stderr"),
        ))
    (base_avg, base_se), (pruned_avg, pruned_se) = before.average_best, after.average_best
    rows.append(ZeroShotRow("zero-shot average", sum(row.n for row in rows), base_avg, base_se, pruned_avg, pruned_se))
    return rows
