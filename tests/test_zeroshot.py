"""Zero-shot scoring: readers and prompts, lm-eval's token boundary, log-likelihoods against raw logits + NumPy,
context reuse against no reuse, --limit, resuming from cached results, and one-line CLI errors.

The reference log-likelihoods come from llama-cpp-python's high-level ``Llama.eval`` with ``logits_all=True``
over the whole context + continuation (one decode, every position's raw logits) and a float64 NumPy
log-softmax, with the tokens built here from lm-eval's rule, independently of the module under test.
"""

from __future__ import annotations

import bz2
import json
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from gatenorm_edge.cache import seal, unseal
from gatenorm_edge.errors import GatenormError
from gatenorm_edge.harness import zeroshot as zs
from gatenorm_edge.harness.logprobs import stderr_of_mean
from gatenorm_edge.report import zeroshot_markdown_rows
from gatenorm_edge.harness.model import open_model
from cli_helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ readers, prompts, tokens


def test_prompts_follow_lm_eval(tiny_data: Path) -> None:
    (arc,) = zs.load_task("arc_easy", tiny_data, limit=1)
    assert arc.requests == (("Question: What is 0+0?\nAnswer:", " 0"), ("Question: What is 0+0?\nAnswer:", " 1"))
    (piqa,) = zs.load_task("piqa", tiny_data)
    assert piqa.requests[0] == ("Question: open a jar\nAnswer:", " twist the lid") and piqa.lengths == (13, 6)
    (obqa,) = zs.load_task("openbookqa", tiny_data)
    assert obqa.requests[1] == ("The sun is a", " moon")
    (boolq,) = zs.load_task("boolq", tiny_data)
    assert boolq.requests == (
        ("Passage: Cats purr.\nQuestion: do cats purr?\nAnswer:", " no"),
        ("Passage: Cats purr.\nQuestion: do cats purr?\nAnswer:", " yes"),
    )
    (wino,) = zs.load_task("winogrande", tiny_data)
    assert wino.requests == (("Ann helped Bo because Ann", " was kind."), ("Ann helped Bo because Bo", " was kind."))
    rte = zs.load_task("rte", tiny_data)
    assert rte[0].requests[0] == ("A dog ran.\nQuestion: An animal ran. True or False?\nAnswer:", " True")
    assert [example.gold for example in rte] == [0, 1]
    (hella,) = zs.load_task("hellaswag", tiny_data)
    assert hella.gold == 2 and hella.requests[2] == ("Cooking: A man cracks an egg. he", " pours it into a pan.")
    assert hella.lengths == (6, 11, 20, 6)


@pytest.mark.parametrize(
    ("relative", "content", "message"),
    [
        ("llm-foundry/arc_easy.jsonl", '{"query": "q", "choices": ["a", "b"], "gold": 2}\n', "gold index 2"),
        ("llm-foundry/arc_easy.jsonl", '{"query": "q", "choices": ["a"], "gold": 0}\n', "at least two"),
        ("llm-foundry/arc_easy.jsonl", "not json\n", "not a JSON line"),
        ("rte/superglue_rte_val.jsonl", '{"premise": "p", "hypothesis": "h", "label": "maybe"}\n', "label"),
    ],
)
def test_bad_rows_name_the_line(tiny_data: Path, relative: str, content: str, message: str) -> None:
    (tiny_data / relative).write_text(content, encoding="utf-8")
    task = "arc_easy" if "arc" in relative else "rte"
    with pytest.raises(GatenormError, match=message):
        zs.load_task(task, tiny_data)


def test_hellaswag_needs_six_lines_per_task(tiny_data: Path) -> None:
    (tiny_data / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(b"ctx\n0\na\nb\n"))
    with pytest.raises(GatenormError, match="multiple of 6"):
        zs.load_task("hellaswag", tiny_data)


def test_limit_is_the_first_n_in_file_order(tiny_data: Path) -> None:
    full = zs.load_task("arc_easy", tiny_data)
    assert zs.load_task("arc_easy", tiny_data, limit=3) == full[:3]
    assert zs.load_task("arc_easy", tiny_data, limit=3) == zs.load_task("arc_easy", tiny_data, limit=3)
    assert zs.load_task("arc_easy", tiny_data, limit=100) == full
    with pytest.raises(GatenormError, match="--limit"):
        zs.load_task("arc_easy", tiny_data, limit=0)


def test_token_boundary_moves_trailing_space_to_the_continuation() -> None:
    """Character 'tokenizer': the context's trailing spaces start the continuation, as in lm-eval."""
    seen: list[str] = []

    def tokenize(text: str) -> list[int]:
        seen.append(text)
        return [ord(char) for char in text]

    context, continuation = zs.encode_pair(tokenize, "Answer:  ", "yes")
    assert seen == ["Answer:  yes", "Answer:"]
    assert "".join(map(chr, context)) == "Answer:" and "".join(map(chr, continuation)) == "  yes"


def test_stderr_and_argmax_as_lm_eval() -> None:
    assert stderr_of_mean([1.0, 0.0, 1.0, 1.0]) == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
    assert stderr_of_mean([1.0]) is None
    assert zs.is_correct([-10.0, -12.0], 0) and not zs.is_correct([-10.0, -12.0], 0, lengths=[2, 12])
    assert zs.is_correct([-5.0, -5.0], 0)  # ties go to the first choice, as np.argmax


# ------------------------------------------------------------------- log-likelihoods on a real model


def reference_loglikelihood(llm: llama_cpp.Llama, context: str, continuation: str) -> float:
    """Tokens by lm-eval's rule, one logits_all decode of context + continuation, float64 log-softmax."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = llm.tokenize((context + continuation).encode("utf-8"), add_bos=True, special=False)
    n_context = len(llm.tokenize(context.encode("utf-8"), add_bos=True, special=False))
    llm.reset()
    llm.eval(whole)
    logits = np.asarray(llm.scores[: len(whole)], dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(sum(log_probs[position - 1, whole[position]] for position in range(n_context, len(whole))))


@pytest.fixture(scope="module")
def smollm2_pair(smollm2: Path):
    model = open_model(smollm2, n_ctx=2048, n_threads=1)
    reference = llama_cpp.Llama(
        str(smollm2), n_ctx=2048, n_batch=2048, n_threads=1, n_threads_batch=1, logits_all=True, flash_attn=True, verbose=False
    )
    yield model, reference
    reference.close()
    model.close()


@pytest.mark.slow
@pytest.mark.parametrize("task", list(zs.TASKS))
def test_loglikelihoods_match_raw_logits(smollm2_pair, data_dir: Path, task: str) -> None:
    """Every format, 2 examples (BoolQ's passages are long: the shortest of its first 20): with context reuse
    and without, ours equal the independent computation."""
    model, reference = smollm2_pair
    examples = zs.load_task(task, data_dir, limit=20)
    if task == "boolq":
        examples = [min(examples, key=lambda example: len(example.requests[0][0]))]
    for example in examples[:2]:
        choices = zs.tokenize_example(model, example)
        expected = [reference_loglikelihood(reference, *request) for request in example.requests]
        reused = zs.choice_loglikelihoods(model, choices, reuse=True)
        fresh = zs.choice_loglikelihoods(model, choices, reuse=False)
        np.testing.assert_allclose(reused, expected, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(fresh, expected, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(reused, fresh, rtol=1e-5, atol=1e-4)
        if task in ("hellaswag", "rte", "boolq"):  # one shared context: reuse must actually share it
            assert zs.shared_prefix(choices) >= min(choice.start for choice in choices)


@pytest.mark.slow
def test_choices_sharing_their_first_tokens(smollm2_pair) -> None:
    """The shared prefix runs past the context into the continuations; their first rows come from it."""
    model, reference = smollm2_pair
    context = "Question: Where did the cat sit?\nAnswer:"
    for endings in ((" on the warm mat", " on the cold floor"), (" on the warm mat", " on the cold floor", " on")):
        example = zs.Example(0, tuple((context, ending) for ending in endings), 0, tuple(map(len, endings)))
        choices = zs.tokenize_example(model, example)
        # " on the" is shared past the context; a choice " on" (one token) caps the prefix at all but its last.
        assert zs.shared_prefix(choices) == min(choices[0].start + 2, min(len(c.tokens) for c in choices) - 1)
        expected = [reference_loglikelihood(reference, *request) for request in example.requests]
        np.testing.assert_allclose(zs.choice_loglikelihoods(model, choices), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_continuation_tokens_spell_the_continuation(smollm2_pair, data_dir: Path) -> None:
    model, _ = smollm2_pair
    (example,) = zs.load_task("arc_easy", data_dir, limit=1)
    for choice, (_, continuation) in zip(zs.tokenize_example(model, example), example.requests):
        assert model.detokenize(list(choice.tokens[choice.start :])).decode("utf-8") == continuation


# ------------------------------------------------------------------------------- caching and resuming


@pytest.mark.slow
def test_interrupted_run_resumes_from_cached_rows(smollm2: Path, tiny_data: Path, tmp_path: Path) -> None:
    """Rows already on disk are used as they are (not recomputed); a row cut short is dropped and redone."""
    cache = tmp_path / "cache"
    first = zs.evaluate(smollm2, "arc_easy", data_dir=tiny_data, limit=2, cache_dir=cache, n_threads=1)
    (task,) = first.tasks
    path = Path(task.results_file)
    rows = [unseal(line) for line in path.read_text().splitlines()]
    assert task.reused == 0 and [row["index"] for row in rows] == [0, 1]

    # Forge example 0's row, sealed as the program seals it, so that it picks the wrong choice: a recomputation
    # would undo this.
    rows[0]["lls"] = [-50.0, -1.0]
    path.write_text(seal(rows[0]) + "\n" + seal(rows[1])[:20], encoding="utf-8")
    second = zs.evaluate(smollm2, "arc_easy", data_dir=tiny_data, limit=3, cache_dir=cache, n_threads=1)
    (task,) = second.tasks
    assert task.n == 3 and task.reused == 1
    stored = [unseal(line) for line in path.read_text().splitlines()]
    assert [row["index"] for row in stored] == [0, 1, 2]
    assert stored[0]["lls"] == [-50.0, -1.0] and stored[1]["lls"] == rows[1]["lls"]
    correct = [zs.is_correct(row["lls"], row["gold"]) for row in stored]
    assert task.acc == pytest.approx(np.mean(correct)) and not correct[0]

    again = zs.evaluate(smollm2, "arc_easy", data_dir=tiny_data, limit=3, cache_dir=cache, n_threads=1)
    assert again.tasks[0].reused == 3 and again.tasks[0].acc == task.acc


def test_a_results_file_is_written_by_one_run_at_a_time(tiny_data: Path, tmp_path: Path) -> None:
    examples = zs.load_task("arc_easy", tiny_data)
    holder = zs.ResultsFile(tmp_path / "rows.jsonl", examples)
    try:
        with pytest.raises(GatenormError, match="another run"):
            zs.ResultsFile(tmp_path / "rows.jsonl", examples)
    finally:
        holder.close()


# ------------------------------------------------------------------------------------------------ CLI


def run_zeroshot(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli("zeroshot", *args)


@pytest.mark.slow
def test_cli_prints_a_table_and_writes_json(smollm2: Path, tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    done = run_zeroshot(str(smollm2), "--tasks", "rte,hellaswag", "--data-dir", str(tiny_data), "--cache-dir",
                   str(tmp_path / "cache"), "--threads", "1", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [task["task"] for task in report["tasks"]] == ["rte", "hellaswag"]
    assert [task["n"] for task in report["tasks"]] == [2, 1]
    assert report["tasks"][0]["acc_norm"] is None and report["tasks"][1]["acc_norm"] is not None
    assert "| rte | 2 |" in done.stdout and "| hellaswag | 1 |" in done.stdout and "**average**" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "rte,squad"], "--tasks: unknown 'squad'"),
        (["--tasks", "rte", "--data-dir", "/nonexistent/data"], "data folder /nonexistent/data not found"),
        (["--tasks", "rte", "--limit", "0"], "--limit must be at least 1"),
        (["--tasks", "rte"], "not a GGUF file"),
    ],
)
def test_cli_bad_input_is_one_line(tiny_data: Path, tmp_path: Path, args: list[str], message: str) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not a gguf")
    extra = [] if "--data-dir" in args else ["--data-dir", str(tiny_data)]
    done = run_zeroshot(str(model), *args, *extra, "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {done.stderr.strip().removeprefix('error: ')}"]
    assert message in done.stderr and not (tmp_path / "cache").exists()


def test_cli_missing_model_and_missing_task_file(tiny_data: Path, tmp_path: Path) -> None:
    done = run_zeroshot(str(tmp_path / "absent.gguf"), "--tasks", "rte", "--data-dir", str(tiny_data))
    assert done.returncode == 2 and done.stderr.strip() == f"error: {tmp_path / 'absent.gguf'}: no such model file"
    (tiny_data / "rte" / "superglue_rte_val.jsonl").unlink()
    done = run_zeroshot(str(tmp_path / "absent.gguf"), "--tasks", "rte", "--data-dir", str(tiny_data))
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "data file" in done.stderr


@pytest.mark.slow
def test_before_after_rows_for_compare(smollm2: Path, tiny_data: Path, tmp_path: Path) -> None:
    from gatenorm_edge.rewrite import prune_gguf

    pruned = tmp_path / "pruned.gguf"
    prune_gguf(smollm2, pruned, [26, 27, 28, 29])
    cache = tmp_path / "cache"
    rows = zs.zeroshot_table(smollm2, pruned, "rte,hellaswag", data_dir=tiny_data, cache_dir=cache, n_threads=1)
    reports = {}
    assert [row.measure for row in rows] == ["rte acc", "hellaswag acc_norm", "zero-shot average"]
    for path, side in ((smollm2, "base"), (pruned, "pruned")):
        report = zs.evaluate(path, "rte,hellaswag", data_dir=tiny_data, cache_dir=cache, n_threads=1)
        assert all(task.reused == task.n for task in report.tasks)  # the table's runs were cached per model
        assert [getattr(row, side) for row in rows] == [report.tasks[0].acc, report.tasks[1].acc_norm, report.average_best[0]]
        reports[side] = zs.ZeroShotReport.from_dict(json.loads(json.dumps(report.to_dict())))
        assert reports[side].to_dict() == report.to_dict()
    assert zs.before_after_rows(reports["base"], reports["pruned"]) == rows  # the table from the two --json files
    cells = zeroshot_markdown_rows(rows)
    assert cells[0][0] == "rte acc (n=2)" and len(cells) == 3 and all(len(row) == 4 for row in cells)


@pytest.mark.slow
def test_compare_adds_zero_shot_rows(smollm2: Path, tinystories: Path, data_dir: Path, tmp_path: Path) -> None:
    import os

    from gatenorm_edge.rewrite import prune_gguf

    pruned = tmp_path / "pruned.gguf"
    prune_gguf(smollm2, pruned, [26, 27, 28, 29])
    out = tmp_path / "compare.json"
    done = subprocess.run(
        [sys.executable, "-m", "gatenorm_edge", "compare", str(smollm2), str(pruned), "--text", str(tinystories), "--ctx", "64",
         "--chunks", "1", "--no-speed", "--threads", "1", "--zeroshot", "rte,piqa", "--limit", "2", "--json", str(out),
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "GATENORM_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["zeroshot"]
    assert [(row["measure"], row["n"]) for row in rows] == [("rte acc", 2), ("piqa acc_norm", 2), ("zero-shot average", 4)]
    assert "| rte acc (n=2) |" in done.stdout and (tmp_path / "cache" / "zeroshot").is_dir()
