"""`gatenorm-edge score` through the command line: output, JSON contract, plot, real models, bad input."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.quants import dequantize

import tiny_models as tm
from gatenorm_edge.scoring import ScoreReport, score_model
from cli_helpers import assert_one_line_error, run_cli, run_cli_here

CONFIG = tm.TinyConfig()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tm.write_llama_gguf(tmp_path_factory.mktemp("cli") / "tiny.gguf", CONFIG, seed=3)


def test_score_prints_table_and_order_and_writes_the_json_contract(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.json"
    result = run_cli_here("score", tiny_gguf, "--json", out)
    assert result.returncode == 0, result.stderr
    report = ScoreReport.from_json(out)
    data = json.loads(out.read_text())
    assert set(data) == {"model", "architecture", "n_layers", "variant", "seconds", "layers", "prune_order"}
    assert (data["architecture"], data["n_layers"], data["variant"]) == ("llama", CONFIG.n_layers, "per-head")
    expected = score_model(tiny_gguf)
    np.testing.assert_allclose([e.score for e in report.layers], [e.score for e in expected.layers], rtol=1e-12)
    assert report.prune_order == expected.prune_order
    assert "| layer | score | prune rank | coupling |" in result.stdout
    for entry in report.layers:
        rank = "kept" if entry.layer == 0 else str(report.prune_order.index(entry.layer) + 1)
        assert f"| {entry.layer} | {entry.score:.6g} | {rank} |" in result.stdout
    assert "prune order (least coupled first; layer 0 is never pruned): " + ", ".join(map(str, report.prune_order)) in result.stdout


def test_help_has_examples() -> None:
    result = run_cli_here("score", "--help")
    assert result.returncode == 0
    assert "Examples" in result.stdout and "--variant" in result.stdout and "--plot" in result.stdout


def test_plot_writes_a_png(tiny_gguf: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is the optional `plot` extra")
    out = tmp_path / "scores.png"
    result = run_cli_here("score", tiny_gguf, "--variant", "folded", "--plot", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.png"]  # no temp file left beside it


def test_plot_without_matplotlib_fails_before_any_output(tiny_gguf: Path, tmp_path: Path) -> None:
    result = run_cli(
        "score", tiny_gguf, "--json", tmp_path / "s.json", "--plot", tmp_path / "s.png",
        prelude="import sys; sys.modules['matplotlib'] = None; ",
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --plot needs matplotlib: pip install 'gatenorm-edge[plot]'"
    assert list(tmp_path.iterdir()) == []


def test_output_in_a_missing_folder_fails_before_scoring(tiny_gguf: Path, tmp_path: Path) -> None:
    result = run_cli_here("score", tiny_gguf, "--json", tmp_path / "absent" / "s.json")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("the folder it would go in does not exist")
    assert result.stdout == ""


def test_real_smollm2_end_to_end(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "smollm2.json"
    result = run_cli_here("score", smollm2, "--json", out)
    assert result.returncode == 0, result.stderr
    report = ScoreReport.from_json(out)
    assert (report.architecture, report.n_layers, len(report.prune_order)) == ("llama", 30, 29)
    assert 0 not in report.prune_order
    # Independent check of three layers: upstream dequantization, dense float64 per-head products.
    reader = GGUFReader(smollm2)
    tensors = {t.name: t for t in reader.tensors}
    head_dim, n_head, n_head_kv = 64, 9, 3
    for layer in (1, 14, 29):
        q = dequantize(tensors[f"blk.{layer}.attn_q.weight"].data, tensors[f"blk.{layer}.attn_q.weight"].tensor_type)
        k = dequantize(tensors[f"blk.{layer}.attn_k.weight"].data, tensors[f"blk.{layer}.attn_k.weight"].tensor_type)
        q, k = q.astype(np.float64), k.astype(np.float64)
        total = 0.0
        for h in range(n_head):
            g = h // (n_head // n_head_kv)
            product = q[h * head_dim : (h + 1) * head_dim].T @ k[g * head_dim : (g + 1) * head_dim]
            total += float(np.sum(product * product))
        assert report.layers[layer].score == pytest.approx(np.sqrt(total), rel=1e-5)


def test_real_stories260k_full_variant(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    result = run_cli_here("score", stories260k, "--variant", "full", "--json", out)
    assert result.returncode == 0, result.stderr
    report = ScoreReport.from_json(out)
    assert (report.variant, report.n_layers, sorted(report.prune_order)) == ("full", 5, [1, 2, 3, 4])


# --- bad input: one line on stderr, exit 2, no traceback, no output file, input untouched -------------


def _hf_folder(folder: Path, drop: str = "", shards: int = 1, **config_overrides: object) -> Path:
    weights = tm.gguf_to_hf_weights(tm.write_llama_gguf(folder.parent / f"{folder.name}.src.gguf", CONFIG), CONFIG)
    weights.pop(drop, None)
    tm.write_hf_checkpoint(folder, weights, tm.hf_config(CONFIG, **config_overrides), shards=shards)
    return folder


def _truncated_gguf(tmp: Path) -> Path:
    path = tm.write_llama_gguf(tmp / "cut.gguf", CONFIG)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return path


def _truncated_safetensors(tmp: Path) -> Path:
    path = _hf_folder(tmp / "cut") / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _header_past_end(tmp: Path) -> Path:
    path = _hf_folder(tmp / "long") / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) * 4).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return path


def _missing_shard(tmp: Path) -> Path:
    folder = _hf_folder(tmp / "shards", shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    return folder


def _no_config(tmp: Path) -> Path:
    folder = _hf_folder(tmp / "noconfig")
    (folder / "config.json").unlink()
    return folder


def _text_file(tmp: Path) -> Path:
    path = tmp / "notes.txt"
    path.write_text("these are notes, not a model\n")
    return path


BAD_INPUTS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("missing file", lambda tmp: tmp / "absent.gguf", "no such file"),
    ("not a model", _text_file, "not a GGUF or safetensors file"),
    ("truncated gguf", _truncated_gguf, "truncated"),
    ("truncated safetensors", _truncated_safetensors, "truncated safetensors file"),
    ("header past end", _header_past_end, "header length"),
    ("unknown gguf arch", lambda tmp: tm.write_llama_gguf(tmp / "g.gguf", CONFIG, arch="gpt2"), "architecture 'gpt2' is not supported"),
    ("unknown hf arch", lambda tmp: _hf_folder(tmp / "gpt2", model_type="gpt2"), "model_type 'gpt2' is not supported"),
    ("missing q gguf", lambda tmp: tm.write_llama_gguf(tmp / "q.gguf", CONFIG, drop={"blk.2.attn_q.weight"}), "layer 2 has no query tensor"),
    ("missing k hf", lambda tmp: _hf_folder(tmp / "k", drop="model.layers.1.self_attn.k_proj.weight"), "layer 1 has no key tensor"),
    ("heads vs width gguf", lambda tmp: tm.write_llama_gguf(tmp / "h.gguf", CONFIG, head_count=7), "head count 7 does not divide the width 64"),
    ("heads vs width hf", lambda tmp: _hf_folder(tmp / "h", num_attention_heads=5, num_key_value_heads=5), "head count 5 does not divide the width 64"),
    ("kv heads", lambda tmp: _hf_folder(tmp / "kv", num_key_value_heads=3), "KV head count 3 does not divide head count 8"),
    ("shape mismatch", lambda tmp: _hf_folder(tmp / "hd", head_dim=4), "expected [32, 64]"),
    ("missing shard", _missing_shard, "no such file"),
    ("moe gguf", lambda tmp: tm.write_llama_gguf(tmp / "moe.gguf", CONFIG, expert_count=8), "mixture-of-experts models (8 experts"),
    ("moe hf", lambda tmp: _hf_folder(tmp / "moe", num_local_experts=8), "mixture-of-experts models (8 experts"),
    ("no config.json", _no_config, "no config.json"),
]


def _snapshot(path: Path) -> dict[str, str]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [p for p in [path] if p.exists()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize(("case", "make", "message"), BAD_INPUTS, ids=[case for case, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_error(tmp_path: Path, case: str, make: Callable[[Path], Path], message: str) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    model = make(inputs)
    outputs = tmp_path / "out"
    outputs.mkdir()
    before = _snapshot(inputs)
    result = run_cli_here("score", model, "--json", outputs / "scores.json")
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(outputs.iterdir()) == []
    assert _snapshot(inputs) == before


@pytest.mark.parametrize(
    ("arch", "prune_reason"),
    [
        ("deci", None),  # prunable again, but not scorable
        ("gemma2", "logit soft-capping"),
        ("phi3", "fused gate/up feed-forward"),
        ("qwen2moe", "mixture-of-experts"),
        ("olmo2", "post-sublayer norms"),
    ],
)
def test_architectures_marked_no_are_refused_in_one_line(tmp_path: Path, arch: str, prune_reason: str | None) -> None:
    """README's architecture table: each "no" is a one-line refusal, with its reason for prune."""
    model = tm.write_llama_gguf(tmp_path / f"{arch}.gguf", CONFIG, arch=arch)
    assert_one_line_error(run_cli_here("score", model), f"architecture '{arch}' is not supported")
    if prune_reason is not None:
        refused = run_cli_here("prune", model, tmp_path / "out.gguf", "--layers", "1")
        assert_one_line_error(refused, f"cannot prune architecture '{arch}'", prune_reason)
        assert not (tmp_path / "out.gguf").exists()
