"""Zero-shot multiple-choice accuracy on a GGUF in llama.cpp, scored as lm-evaluation-harness scores it.

Tasks and prompts (lm-eval's zero-shot prompts; the data are the files in ``../shared/data``):

- arc_easy, arc_challenge, piqa: ``{query}\\nAnswer:`` (the llm-foundry query already reads
  ``Question: ...``), choices `` {choice}``; acc and acc_norm.
- boolq: the file's own query (``Passage: ...\\nQuestion: ...?``) + ``\\nAnswer:``, choices `` no``/`` yes``; acc.
- openbookqa: the question stem, choices `` {choice}``; acc and acc_norm.
- rte: ``{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:``, choices `` True``/`` False``
  (entailment is True); acc.
- hellaswag: llama.cpp's 6-line layout (context, gold index, four endings; already preprocessed as lm-eval
  preprocesses), choices `` {ending}``; acc and acc_norm.
- winogrande: partial scoring: each option's context, then the shared continuation `` {rest}``; acc.

The log-likelihood of a continuation is the sum of its tokens' log-probabilities given everything before
them. The token boundary is lm-eval's: trailing whitespace of the context moves onto the continuation,
``context`` and ``context + continuation`` are tokenized (BOS added when the vocab adds one) and the
continuation's tokens are the tail of the second beyond the length of the first. acc_norm divides each
log-likelihood by the choice's length in characters. Standard errors are the sample standard deviation of
the per-example scores over sqrt(n), as lm-eval reports them.

Speed: the tokens that every choice of an example shares (at least the context) are decoded once and kept
in the KV cache; each choice then decodes only its own tail and the cache is cut back to the shared prefix.
``--limit N`` takes the first N examples of the file (as lm-eval's ``--limit``). Per-example results are
appended to a jsonl per (model, task, data file) under the cache folder as they are computed, so a rerun
(any limit) reuses them and an interrupted run resumes.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import llama_cpp
import numpy as np

from ..errors import GatenormError
from ..fileio import file_sha256
from ..sources import GGUFFile
from .model import LoadedModel, open_model, training_context
from ..progress import progress_bar

RESULTS_VERSION = 1  # bump when prompts or scoring change: old cached results stop matching
LOGSUMEXP_ROWS = 32  # rows of logits turned into float64 at a time
MAX_CONTEXT = 4096  # KV cells: the longest example here (a BoolQ passage) needs about 1300


# ---------------------------------------------------------------------------------------------- tasks


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


def parse_tasks(names: str | Sequence[str]) -> list[str]:
    """Validated task names from ``"boolq,rte"`` or a list (order kept, duplicates dropped)."""
    items = names.split(",") if isinstance(names, str) else list(names)
    tasks = list(dict.fromkeys(item.strip() for item in items if item.strip()))
    if not tasks:
        raise GatenormError(f"no task given; choose from {', '.join(TASKS)}")
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise GatenormError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    return tasks


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


# --------------------------------------------------------------------------------------------- scoring


def encode_pair(tokenize: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's token boundary: (context tokens, continuation tokens = tail of the joint tokenization)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenize(context + continuation)
    context_tokens = tokenize(context)
    continuation_tokens = whole[len(context_tokens) :]
    if not context_tokens or not continuation_tokens:
        raise GatenormError(f"cannot score {continuation!r} after {context[-40:]!r}: an empty side after tokenization")
    return context_tokens, continuation_tokens


@dataclass(frozen=True)
class ChoiceTokens:
    """One choice as the model reads it: ``tokens`` (context then continuation), continuation from ``start``."""

    tokens: tuple[int, ...]
    start: int


def tokenize_example(model: LoadedModel, example: Example) -> list[ChoiceTokens]:
    """Each choice's tokens; an error when one would not fit in the model's context."""
    choices = []
    for context, continuation in example.requests:
        context_tokens, continuation_tokens = encode_pair(model.tokenize_text, context, continuation)
        tokens = tuple(context_tokens + continuation_tokens)
        if len(tokens) > model.n_ctx():
            raise GatenormError(f"example {example.index} needs {len(tokens)} tokens, over the context of {model.n_ctx()}")
        choices.append(ChoiceTokens(tokens, len(context_tokens)))
    return choices


def shared_prefix(choices: Sequence[ChoiceTokens]) -> int:
    """How many leading tokens every choice has in common, leaving each at least its last token."""
    limit = min(len(choice.tokens) for choice in choices) - 1
    first = choices[0].tokens
    length = 0
    while length < limit and all(choice.tokens[length] == first[length] for choice in choices):
        length += 1
    return length


def row_logsumexp(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(row))) of each row, in float64, a block of rows at a time."""
    out = np.empty(logits.shape[0], dtype=np.float64)
    for low in range(0, logits.shape[0], LOGSUMEXP_ROWS):
        block = logits[low : low + LOGSUMEXP_ROWS].astype(np.float64)
        peak = block.max(axis=1)
        out[low : low + LOGSUMEXP_ROWS] = peak + np.log(np.exp(block - peak[:, None]).sum(axis=1))
    return out


def target_logprobs(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """log p(target_i) under row i of ``logits`` (float64)."""
    chosen = logits[np.arange(len(targets)), np.asarray(targets)].astype(np.float64)
    return chosen - row_logsumexp(logits)


def keep_cache_prefix(model: LoadedModel, n_tokens: int) -> None:
    """Cut sequence 0 of the KV cache back to its first ``n_tokens`` positions."""
    memory = llama_cpp.llama_get_memory(model.ctx)
    if not llama_cpp.llama_memory_seq_rm(memory, 0, n_tokens, -1):
        raise GatenormError(f"{model.path}: llama.cpp could not trim its KV cache to {n_tokens} tokens")
    model.n_tokens = n_tokens


def choice_loglikelihoods(model: LoadedModel, choices: Sequence[ChoiceTokens], *, reuse: bool = True) -> list[float]:
    """Summed log-likelihood of each choice's continuation.

    With ``reuse`` the prefix all choices share is decoded once and kept in the KV cache while each choice
    decodes only its own tokens; without it every choice is decoded from an empty cache (lm-eval's way).
    The last token of a choice is never decoded: nothing reads the logits it would produce.
    """
    prefix = shared_prefix(choices) if reuse else 0
    # Rows of the prefix from the first position whose logits a continuation reads (none if it starts later).
    prefix_first = min(min(choice.start for choice in choices) - 1, prefix)
    model.clear()
    prefix_logits = np.empty((0, model.vocab_size), dtype=np.float32)
    if prefix:
        prefix_logits = model.logits(choices[0].tokens[:prefix], output_from=prefix_first)
    results = []
    for choice in choices:
        if prefix:
            keep_cache_prefix(model, prefix)
        else:
            model.clear()
        own_first = max(choice.start - 1, prefix)
        own_logits = model.logits(choice.tokens[prefix:-1], start=prefix, output_from=own_first - prefix)
        positions = range(choice.start - 1, len(choice.tokens) - 1)
        rows = [
            prefix_logits[position - prefix_first] if position < prefix else own_logits[position - own_first]
            for position in positions
        ]
        targets = [choice.tokens[position + 1] for position in positions]
        results.append(float(target_logprobs(np.stack(rows), targets).sum()))
    return results


# ---------------------------------------------------------------------------------------- results cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("GATENORM_CACHE", Path.home() / ".cache" / "gatenorm-edge")) / "zeroshot"


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


# --------------------------------------------------------------------------------------------- metrics


def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's stderr of a mean: sample standard deviation (n-1) over sqrt(n); None below two values."""
    if len(values) < 2:
        return None
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


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
            acc_stderr=mean_stderr(acc),
            acc_norm=float(np.mean(norm)) if normalised else None,
            acc_norm_stderr=mean_stderr(norm) if normalised else None,
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

    def markdown(self) -> str:
        """A Markdown table: task, n, acc ± stderr, acc_norm ± stderr, CPU minutes; then the averages."""
        lines = ["| task | n | acc | acc_norm | CPU min |", "|---|---:|---:|---:|---:|"]
        for task in self.tasks:
            lines.append(
                f"| {task.task} | {task.n} | {_pm(task.acc, task.acc_stderr)} | "
                f"{_pm(task.acc_norm, task.acc_norm_stderr)} | {task.cpu_seconds / 60:.1f} |"
            )
        average, average_stderr = self.average_acc
        best, best_stderr = self.average_best
        cpu = sum(task.cpu_seconds for task in self.tasks) / 60
        lines.append(f"| **average** | {sum(t.n for t in self.tasks)} | {_pm(average, average_stderr)} | "
                     f"{_pm(best, best_stderr)}¹ | {cpu:.1f} |")
        lines.append("")
        lines.append("¹ average of acc_norm where the task reports it, acc elsewhere.")
        return "\n".join(lines)


def _pm(value: float | None, error: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f} ± {error:.4f}" if error is not None else f"{value:.4f}"


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_task(
    model: LoadedModel,
    task: str,
    examples: Sequence[Example],
    results: ResultsFile,
    *,
    progress: bool = False,
) -> TaskResult:
    """Score the examples not yet in ``results`` (appending each as it is done) and summarise them all.

    The progress bar shows the running acc_norm where the task reports it, else acc.
    """
    normalised = TASKS[task].normalised
    todo = [example for example in examples if example.index not in results.done]
    reused = len(examples) - len(todo)
    correct = [
        is_correct(results.done[example.index].lls, example.gold, example.lengths if normalised else None)
        for example in examples
        if example.index in results.done
    ]
    metric = "acc_norm" if normalised else "acc"
    with progress_bar(f"{task} {Path(model.path).name}", len(examples), progress) as tick:
        tick(advance=reused, status=f"{metric} {np.mean(correct):.3f}" if correct else "")
        for example in todo:
            wall, cpu = time.perf_counter(), time.process_time()
            lls = choice_loglikelihoods(model, tokenize_example(model, example))
            results.add(
                ExampleResult(example.index, example.gold, lls, time.perf_counter() - wall, time.process_time() - cpu)
            )
            correct.append(is_correct(lls, example.gold, example.lengths if normalised else None))
            tick(status=f"{metric} {np.mean(correct):.3f}")
    return TaskResult.from_results(task, examples, results.done, reused, results.path)


def model_context(model_path: Path) -> int:
    """The training context (from the GGUF), capped: the KV cache only ever holds one example's tokens."""
    trained = training_context(GGUFFile(model_path))
    return min(trained or MAX_CONTEXT, MAX_CONTEXT)


def evaluate(
    model_path: Path | str,
    tasks: str | Sequence[str],
    *,
    data_dir: Path | str | None = None,
    limit: int | None = None,
    cache_dir: Path | str | None = None,
    n_threads: int | None = None,
    flash_attn: bool = True,
    progress: bool = False,
) -> ZeroShotReport:
    """Zero-shot accuracy of the GGUF at ``model_path`` on ``tasks`` (resuming from cached results)."""
    model_path = Path(model_path)
    names = parse_tasks(tasks)
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    if not data.is_dir():
        raise GatenormError(f"data folder {data} not found")
    loaded = {task: load_task(task, data, limit) for task in names}
    if not model_path.is_file():
        raise GatenormError(f"{model_path}: no such model file")
    model_sha = file_sha256(model_path)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with contextlib.closing(
        open_model(model_path, n_ctx=model_context(model_path), flash_attn=flash_attn, n_threads=n_threads)
    ) as model:
        report = ZeroShotReport(str(model_path), model_sha, str(data), limit, flash_attn, model.n_threads)
        for task, examples in loaded.items():
            path = results_path(cache, model_sha, model_path.stat().st_size, task, file_sha256(task_file(task, data)))
            results = ResultsFile(path, examples)
            try:
                report.tasks.append(evaluate_task(model, task, examples, results, progress=progress))
            finally:
                results.close()
    return report


# ------------------------------------------------------------------------------------ before vs after


def zeroshot_table(
    base: Path | str,
    pruned: Path | str,
    tasks: str | Sequence[str],
    limit: int | None = None,
    *,
    data_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    n_threads: int | None = None,
    flash_attn: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Accuracy before vs after, one row per task (acc_norm where lm-eval reports it, acc elsewhere) + the average.

    Each row: ``{"measure", "n", "base", "base_stderr", "pruned", "pruned_stderr"}`` (JSON-ready).
    """
    reports = [
        evaluate(path, tasks, data_dir=data_dir, limit=limit, cache_dir=cache_dir, n_threads=n_threads,
                 flash_attn=flash_attn, progress=progress)
        for path in (base, pruned)
    ]
    rows = []
    for before, after in zip(reports[0].tasks, reports[1].tasks):
        metric = "acc_norm" if before.acc_norm is not None else "acc"
        rows.append({
            "measure": f"{before.task} {metric}",
            "n": before.n,
            "base": getattr(before, metric),
            "base_stderr": getattr(before, f"{metric}_stderr"),
            "pruned": getattr(after, metric),
            "pruned_stderr": getattr(after, f"{metric}_stderr"),
        })
    (base_avg, base_se), (pruned_avg, pruned_se) = reports[0].average_best, reports[1].average_best
    rows.append({"measure": "zero-shot average", "n": sum(row["n"] for row in rows), "base": base_avg,
                 "base_stderr": base_se, "pruned": pruned_avg, "pruned_stderr": pruned_se})
    return rows


def zeroshot_markdown_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """``zeroshot_table`` rows as cells for a (measure, base, pruned, pruned / base) Markdown table."""
    return [
        [f"{row['measure']} (n={row['n']})", _pm(row["base"], row["base_stderr"]),
         _pm(row["pruned"], row["pruned_stderr"]), f"{row['pruned'] / row['base']:.3f}×" if row["base"] else ""]
        for row in rows
    ]
