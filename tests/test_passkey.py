"""Pass-key retrieval: prompts built as specified, a base model that recalls, a gutted model that cannot."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli, run_cli_here
from gatenorm_edge.harness.model import open_model
from gatenorm_edge.harness.passkey import ANSWER_TOKENS, NEEDLE, POSITIONS, PromptParts, passkey
from gatenorm_edge.rewrite import prune_gguf


def test_prompt_puts_the_key_at_its_depth_and_fits_the_context(smollm2: Path) -> None:
    with contextlib.closing(open_model(smollm2, n_ctx=1024)) as model:
        parts = PromptParts.for_model(model, 1024)
        needle = model.tokenize(NEEDLE.format(key="31415").encode(), add_bos=False, special=False)
        for position in POSITIONS:
            prompt = parts.prefix(position) + parts.suffix(model, position, "31415")
            assert len(prompt) <= 1024 - ANSWER_TOKENS
            assert len(prompt) > 1024 - ANSWER_TOKENS - 2 * len(parts.filler) - len(needle)  # the context is filled
            start = len(parts.prefix(position))
            assert prompt[start : start + len(needle)] == needle
            filler_tokens = len(prompt) - len(parts.instruction) - len(parts.question) - len(needle)
            depth = (start - len(parts.instruction)) / filler_tokens
            assert depth == pytest.approx(position, abs=len(parts.filler) / filler_tokens)
        text = model.detokenize(parts.prefix(0.5) + parts.suffix(model, 0.5, "31415")).decode()
        assert text.count("31415") == 2 and text.rstrip().endswith("The pass key is")


@pytest.mark.slow
def test_base_model_recalls_and_an_attention_free_one_does_not(smollm2: Path, tmp_path: Path) -> None:
    base = passkey(smollm2, 768, trials=5, n_threads=2)
    assert [t.position for t in base.details] == list(POSITIONS)
    assert len({t.key for t in base.details}) == 5 and all(len(t.key) == 5 for t in base.details)
    assert base.accuracy == 1.0, [(t.key, t.answer) for t in base.details]
    gutted = tmp_path / "gutted.gguf"
    prune_gguf(smollm2, gutted, list(range(1, 29)))  # only layers 0 and 29 keep their attention
    blind = passkey(gutted, 768, trials=5, n_threads=2)
    assert blind.accuracy <= 0.2, [(t.key, t.answer) for t in blind.details]
    assert passkey(smollm2, 768, trials=5, n_threads=2).details == base.details  # keys and answers reproducible


@pytest.mark.slow
def test_cli_writes_the_json_contract(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "passkey.json"
    done = run_cli("passkey", smollm2, "--ctx", "512", "--trials", "3", "--threads", "2", "--json", out)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert {"model", "ctx", "trials", "accuracy", "by_position"} <= set(data)
    assert data["ctx"] == 512 and data["trials"] == 3 and len(data["by_position"]) == 3
    assert data["accuracy"] == pytest.approx(sum(d["accuracy"] for d in data["by_position"]) / 3)
    assert "| key depth | trials | accuracy |" in done.stdout and "FA on" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ctx", "100000"], "--ctx 100000 exceeds SmolLM2-135M-Instruct.Q4_1.gguf's training context of 8192 tokens"),
        (["--ctx", "64"], "too small"),
        (["--ctx", "1024", "--trials", "0"], "--trials must be at least 1"),
    ],
)
def test_bad_input_is_one_line(smollm2: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "p.json"
    assert_one_line_error(run_cli_here("passkey", smollm2, *args, "--json", out), message)
    assert not out.exists()


@pytest.mark.slow
def test_compare_long_adds_long_context_rows(smollm2: Path, wikitext: Path, tmp_path: Path) -> None:
    pruned = tmp_path / "pruned.gguf"
    prune_gguf(smollm2, pruned, [26, 27, 28, 29])
    out = tmp_path / "compare.json"
    done = run_cli("compare", smollm2, pruned, "--text", wikitext, "--ctx", "128", "--chunks", "2", "--no-speed",
                   "--threads", "2", "--long", "--long-ctx", "512", "--long-chunks", "1", "--long-trials", "2",
                   "--json", out)
    assert done.returncode == 0, done.stderr
    (entry,) = json.loads(out.read_text())["long_context"]
    assert entry["ctx"] == 512 and entry["perplexity"]["base"]["ctx"] == 512
    assert entry["perplexity"]["base"]["tokens_scored"] == 255 and entry["kld"]["tokens"] == 255
    assert entry["passkey"]["base"]["trials"] == entry["passkey"]["pruned"]["trials"] == 2
    assert "| pass-key retrieval, ctx 512, 2 trials |" in done.stdout and "| KLD at ctx 512" in done.stdout


def test_compare_long_refuses_a_context_beyond_training(smollm2: Path, wikitext: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    assert_one_line_error(
        run_cli_here("compare", smollm2, smollm2, "--text", wikitext, "--long", "--long-ctx", "4096,16384", "--json", out),
        "--ctx 16384 exceeds SmolLM2-135M-Instruct.Q4_1.gguf's training context of 8192 tokens",
    )
    assert not out.exists()
