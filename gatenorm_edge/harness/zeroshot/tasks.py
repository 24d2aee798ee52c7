"""Zero-shot task data: readers for each file layout, lm-eval's prompts, and the task table.

Prompts are lm-eval's zero-shot ones (see ``harness.zeroshot``); the data are the files in
``../shared/data``: llm-foundry jsonl, SuperGLUE RTE jsonl, and HellaSwag in llama.cpp's 6-line layout.
"""

from __future__ import annotations

import bz2
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import GatenormError
from ...options import comma_names

@dataclass(frozen=True)
class Example:
    """One multiple-choice item: a (context, continuation) request per choice and the gold index."""

    index: int
    requests: tuple[tuple[str, str], ...]
    gold: int
    lengths: tuple[int, ...]  # characters of each choice, for acc_norm


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives, how to read it and whether lm-eval reports acc_norm for it."""

    name: str
    relative_path: str
    reader: Callable[[Path], list[Example]]
    normalised: bool


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise GatenormError(f"{path}:{number}: not a JSON line") from None
            if not isinstance(row, dict):
                raise GatenormError(f"{path}:{number}: expected a JSON object")
            yield number, row


def _field(path: Path, number: int, row: dict[str, Any], key: str, kind: type) -> Any:
    value = row.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise GatenormError(f"{path}:{number}: field {key!r} missing or not a {kind.__name__}")
    return value


def _gold(path: Path, number: int, row: dict[str, Any], n_choices: int) -> int:
    gold = _field(path, number, row, "gold", int)
    if not 0 <= gold < n_choices:
        raise GatenormError(f"{path}:{number}: gold index {gold} outside 0..{n_choices - 1}")
    return gold


def _choices(path: Path, number: int, row: dict[str, Any], key: str) -> list[str]:
    choices = _field(path, number, row, key, list)
    if len(choices) < 2 or not all(isinstance(choice, str) for choice in choices):
        raise GatenormError(f"{path}:{number}: {key!r} must list at least two strings")
    return choices


def _question_answer_reader(prompt: Callable[[str], str]) -> Callable[[Path], list[Example]]:
    """llm-foundry ``{query, choices, gold}`` rows; context ``prompt(query)``, continuations `` {choice}``."""

    def read(path: Path) -> list[Example]:
        examples = []
        for number, row in _jsonl_rows(path):
            context = prompt(_field(path, number, row, "query", str))
            choices = _choices(path, number, row, "choices")
            examples.append(
                Example(
                    index=len(examples),
                    requests=tuple((context, " " + choice) for choice in choices),
                    gold=_gold(path, number, row, len(choices)),
                    lengths=tuple(len(choice) for choice in choices),
                )
            )
        return examples

    return read


def answer_prompt(query: str) -> str:
    """``{query}\\nAnswer:``; a query that already ends its line (piqa's ``Question: ...\\n``) is not doubled."""
    return query.removesuffix("\n") + "\nAnswer:"


def read_winogrande(path: Path) -> list[Example]:
    """llm-foundry ``{context_options, continuation, gold}``: one context per option, a shared continuation."""
    examples = []
    for number, row in _jsonl_rows(path):
        options = _choices(path, number, row, "context_options")
        continuation = " " + _field(path, number, row, "continuation", str).strip()
        examples.append(
            Example(
                index=len(examples),
                requests=tuple((option, continuation) for option in options),
                gold=_gold(path, number, row, len(options)),
                lengths=tuple(len(continuation) - 1 for _ in options),
            )
        )
    return examples


RTE_LABELS = {"entailment": 0, "not_entailment": 1, 0: 0, 1: 1}


def read_rte(path: Path) -> list[Example]:
    """SuperGLUE RTE ``{premise, hypothesis, label}`` with lm-eval's True/False prompt."""
    examples = []
    for number, row in _jsonl_rows(path):
        premise = _field(path, number, row, "premise", str)
        hypothesis = _field(path, number, row, "hypothesis", str)
        label = row.get("label")
        if isinstance(label, bool) or label not in RTE_LABELS:
            raise GatenormError(f"{path}:{number}: label {label!r} is neither entailment nor not_entailment")
        context = f"{premise}\nQuestion: {hypothesis} True or False?\nAnswer:"
        examples.append(
            Example(
                index=len(examples),
                requests=((context, " True"), (context, " False")),
                gold=RTE_LABELS[label],
                lengths=(4, 5),
            )
        )
    return examples


def read_hellaswag(path: Path) -> list[Example]:
    """llama.cpp's ``--hellaswag`` text (optionally bz2): context, gold index, four endings per 6 lines."""
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise GatenormError(f"{path}: cannot read it ({exc})") from None
    if not lines or len(lines) % 6:
        raise GatenormError(f"{path}: {len(lines)} lines, not a multiple of 6 (context, gold, 4 endings)")
    examples = []
    for start in range(0, len(lines), 6):
        context, gold_line, *endings = lines[start : start + 6]
        if not gold_line.strip().isdigit() or int(gold_line) >= len(endings):
            raise GatenormError(f"{path}:{start + 2}: gold index {gold_line!r} is not 0..3")
        examples.append(
            Example(
                index=len(examples),
                requests=tuple((context, " " + ending) for ending in endings),
                gold=int(gold_line),
                lengths=tuple(len(ending) for ending in endings),
            )
        )
    return examples


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("boolq", "llm-foundry/boolq.jsonl", _question_answer_reader(answer_prompt), False),
        TaskSpec("rte", "rte/superglue_rte_val.jsonl", read_rte, False),
        TaskSpec("hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", read_hellaswag, True),
        TaskSpec("winogrande", "llm-foundry/winogrande.jsonl", read_winogrande, False),
        TaskSpec("arc_easy", "llm-foundry/arc_easy.jsonl", _question_answer_reader(answer_prompt), True),
        TaskSpec("arc_challenge", "llm-foundry/arc_challenge.jsonl", _question_answer_reader(answer_prompt), True),
        TaskSpec("openbookqa", "llm-foundry/openbook_qa.jsonl", _question_answer_reader(lambda query: query), True),
        TaskSpec("piqa", "llm-foundry/piqa.jsonl", _question_answer_reader(answer_prompt), True),
    )
}


def parse_tasks(names: str | Sequence[str], option: str = "--tasks") -> list[str]:
    """Validated task names from ``"boolq,rte"`` or a list (order kept, duplicates dropped)."""
    return comma_names(option, names if isinstance(names, str) else ",".join(names), tuple(TASKS))


def task_file(task: str, data_dir: Path) -> Path:
    path = Path(data_dir) / TASKS[task].relative_path
    if not path.is_file():
        raise GatenormError(f"{task}: data file {path} not found (expected the layout of ../shared/data)")
    return path


def load_task(task: str, data_dir: Path, limit: int | None = None) -> list[Example]:
    """The task's examples in file order; ``limit`` keeps the first N (lm-eval's ``--limit``)."""
    if limit is not None and limit < 1:
        raise GatenormError(f"--limit must be at least 1, got {limit}")
    examples = TASKS[task].reader(task_file(task, data_dir))
    return examples if limit is None else examples[:limit]


def default_data_dir() -> Path:
    """``../shared/data`` beside the current folder, else beside this checkout; a one-line error otherwise."""
    candidates = [Path.cwd().parent / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise GatenormError(f"no task data found at {' or '.join(map(str, dict.fromkeys(candidates)))}; pass --data-dir")


