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

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...errors import GatenormError
from ...fileio import cache_folder, file_sha256
from ...progress import progress_bar
from ...sources import GGUFFile
from ..model import LoadedModel, open_model, training_context
from .cache import ExampleResult, ResultsFile, results_path
from .loglikelihood import choice_loglikelihoods, encode_pair, shared_prefix, tokenize_example
from .report import TaskResult, ZeroShotReport, ZeroShotRow, before_after_rows, is_correct
from .tasks import TASKS, Example, default_data_dir, load_task, parse_tasks, task_file

__all__ = [
    "TASKS", "Example", "ResultsFile", "ZeroShotReport", "before_after_rows", "choice_loglikelihoods",
    "default_data_dir", "encode_pair", "evaluate",
    "is_correct", "load_task", "parse_tasks", "shared_prefix", "tokenize_example",
    "zeroshot_table",
]

MAX_CONTEXT = 4096  # KV cells: the longest example here (a BoolQ passage) needs about 1300


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
    cache = Path(cache_dir) if cache_dir is not None else cache_folder("zeroshot")
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
) -> list[ZeroShotRow]:
    """Accuracy before vs after, one row per task (acc_norm where lm-eval reports it, acc elsewhere) + the average."""
    reports = [
        evaluate(path, tasks, data_dir=data_dir, limit=limit, cache_dir=cache_dir, n_threads=n_threads,
                 flash_attn=flash_attn, progress=progress)
        for path in (base, pruned)
    ]
    return before_after_rows(*reports)
