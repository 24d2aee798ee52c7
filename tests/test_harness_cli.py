"""`ppl`, `bench` and `compare` through the real CLI: outputs, and bad input -> one line, exit != 0, no file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatenorm_edge.harness import perplexity as perplexity_module
from gatenorm_edge.harness.perplexity import perplexity
from gatenorm_edge.rewrite import prune_gguf
from cli_helpers import assert_one_line_error, run_cli, run_cli_here


@pytest.fixture(scope="module")
def stories_pruned(stories260k: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stories_cli") / "pruned.gguf"
    prune_gguf(stories260k, out, [4])
    return out


def test_ppl_writes_the_json_contract(stories260k: Path, tinystories: Path, tmp_path: Path) -> None:
    out = tmp_path / "ppl.json"
    done = run_cli("ppl", stories260k, "--text", tinystories, "--ctx", "64", "--chunks", "3", "--json", out)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"model", "text", "ctx", "chunks", "tokens_scored", "ppl", "ppl_stderr", "seconds", "flash_attn", "cache_type"}
    assert data["chunks"] == 3 and data["tokens_scored"] == 3 * 31 and data["flash_attn"] is True
    assert 1 < data["ppl"] < 512 and data["ppl_stderr"] > 0  # better than uniform over stories260K's 512 tokens
    assert "FA on" in done.stdout and f"{data['ppl']:.4f}" in done.stdout


def test_compare_prints_and_writes_the_table(stories260k: Path, stories_pruned: Path, tinystories: Path, tmp_path: Path) -> None:
    md, js = tmp_path / "compare.md", tmp_path / "compare.json"
    done = run_cli(
        "compare", stories260k, stories_pruned, "--text", tinystories, "--ctx", "64", "--chunks", "4",
        "--prompt", "16", "--gen", "4", "--depth", "0,32", "--reps", "2", "--threads", "1", "--md", md, "--json", js,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = md.read_text()
    assert table.strip() in done.stdout
    for row in ("file size", "PPL,", "KLD (pruned from base)", "KLD 99th percentile", "top-1 agreement",
                "pp16 t/s @ depth 0", "tg4 t/s @ depth 32", "KV cache", "peak RSS"):  # fmt: skip
        assert row in table, row
    data = json.loads(js.read_text())
    assert data["kld"]["kld_mean"] > 0 and 0 <= data["kld"]["top1_agreement"] <= 1
    assert data["kld"]["kld_p99"] >= data["kld"]["kld_median"]
    assert data["perplexity"]["base"]["tokens_scored"] == data["kld"]["tokens"] == 4 * 31
    assert data["speed"]["kv_bytes"][str(stories_pruned)] * 5 == data["speed"]["kv_bytes"][str(stories260k)] * 4
    assert data["file_bytes"]["pruned"] < data["file_bytes"]["base"]


def test_bench_prints_the_table_and_writes_json(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = run_cli("bench", stories260k, "--prompt", "16", "--gen", "4", "--depth", "0", "--reps", "1", "--threads", "1", "--json", out)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["models"] == [str(stories260k)] and data["ratios"] == {"pp": {}, "tg": {}}
    assert "pp16 @ d0 t/s, FA on" in done.stdout and "tg4 @ d0 t/s, FA on" in done.stdout
    assert "KV cache (256 cells, FA on)" in done.stdout


@pytest.fixture(scope="module")
def bad_texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("texts")
    texts = {"short": "Once upon a time there was a cat.\n", "empty": "", "blank": " \n\n"}
    paths = {name: folder / f"{name}.txt" for name in texts}
    for name, text in texts.items():
        paths[name].write_text(text)
    paths["latin1"] = folder / "latin1.txt"
    paths["latin1"].write_bytes("caf\xe9 au lait, " .encode("latin-1") * 100)
    paths["notgguf"] = folder / "model.gguf"
    paths["notgguf"].write_bytes(b"PK\x03\x04 this is a zip, not a GGUF" * 10)
    return paths


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("short", ["too short", "at least 128"]),
        ("empty", ["empty"]),
        ("blank", ["empty"]),
        ("latin1", ["not UTF-8"]),
    ],
)
def test_ppl_rejects_bad_text(case: str, fragments: list[str], stories260k: Path, bad_texts: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ppl.json"
    done = run_cli("ppl", stories260k, "--text", bad_texts[case], "--ctx", "64", "--json", out)
    assert_one_line_error(done, *fragments)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_ppl_rejects_ctx_above_training_context(stories260k: Path, tinystories: Path, tmp_path: Path) -> None:
    done = run_cli("ppl", stories260k, "--text", tinystories, "--ctx", "4096", "--json", tmp_path / "p.json")
    assert_one_line_error(done, "4096", "training context of 2048")
    assert list(tmp_path.iterdir()) == []


def test_commands_reject_a_file_that_is_not_gguf(bad_texts: dict[str, Path], stories260k: Path, tinystories: Path, tmp_path: Path) -> None:
    before = bad_texts["notgguf"].read_bytes()
    for args in (
        ("ppl", bad_texts["notgguf"], "--text", tinystories),
        ("bench", bad_texts["notgguf"], "--depth", "0", "--reps", "1"),
        ("compare", stories260k, bad_texts["notgguf"], "--text", tinystories, "--json", tmp_path / "c.json"),
    ):
        assert_one_line_error(run_cli_here(*args), "not a GGUF")
    assert bad_texts["notgguf"].read_bytes() == before
    assert list(tmp_path.iterdir()) == []


def test_bench_rejects_bad_depth_list(stories260k: Path) -> None:
    assert_one_line_error(run_cli_here("bench", stories260k, "--depth", "0,lots"), "--depth")


def test_a_context_beyond_memory_is_one_line(smollm2: Path, wikitext: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(perplexity_module, "proc_bytes", lambda path, key: 3 * 2**29)  # 1.5 GiB available
    out = tmp_path / "p.json"
    # SmolLM2 at ctx 8192: 49,152 logits x (2,048 + 4,096) rows x 4 bytes = 1.1 GiB, plus 1 GiB > 1.5 GiB
    assert_one_line_error(run_cli_here("ppl", smollm2, "--text", wikitext, "--ctx", "8192", "--json", out),
                          "--ctx 8192 needs about 1.1 GiB", "1.5 GiB available")
    assert not out.exists()


@pytest.mark.slow
def test_perplexity_at_a_long_context(smollm2: Path, wikitext: Path) -> None:
    result = perplexity(smollm2, wikitext, ctx=4096, chunks=1, n_threads=2)
    assert result.tokens_scored == 2047 and 5 < result.ppl < 60  # SmolLM2 sees 4,096 tokens of WikiText-2
