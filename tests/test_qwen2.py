"""qwen2 -> deci: Q/K rows reordered from NEOX to normal RoPE, proven exactly and measured in llama.cpp."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest


from gatenorm_edge.reference import ReferenceModel, rope_angles, rope_neox, rope_normal
from gatenorm_edge.rewrite import prune_gguf
from gatenorm_edge.sources.gguf_file import GGUFFile

ROOT = Path(__file__).resolve().parents[1]
N_TOKENS = 512


def _exact_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp logits on its most exact CPU path: flash attention off, F32 KV cache."""
    model = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, flash_attn=False,
        type_k=0, type_v=0, verbose=False, n_threads=2,
    )
    model.eval(tokens)
    logits = np.array(model.scores[: len(tokens)], dtype=np.float64)
    model.close()
    return logits


@pytest.mark.slow
def test_tiny_qwen2_rewrite_matches_the_reference_to_float_precision(tiny_qwen2: Path, tmp_path: Path) -> None:
    tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
    reference = ReferenceModel.from_gguf(tiny_qwen2)
    expected = reference.forward(tokens)
    # the reference's NEOX path with biases is llama.cpp's qwen2 graph
    np.testing.assert_allclose(_exact_logits(tiny_qwen2, tokens), expected, atol=1e-4)
    deci = tmp_path / "deci.gguf"
    assert len(prune_gguf(tiny_qwen2, deci, []).permuted_tensors) == 4 * 5
    np.testing.assert_allclose(_exact_logits(deci, tokens), expected, atol=1e-4)
    pruned = tmp_path / "pruned.gguf"
    prune_gguf(tiny_qwen2, pruned, [2, 4])
    skipped = reference.forward(tokens, skip_attention=[2, 4])
    np.testing.assert_allclose(_exact_logits(pruned, tokens), skipped, atol=1e-4)
    assert np.abs(skipped - expected).max() > 0.1
    # a rewrite that renamed keys but kept NEOX rows (normal RoPE on them) would be another model
    unpermuted = ReferenceModel.from_gguf(tiny_qwen2)
    unpermuted.args = dataclasses.replace(unpermuted.args, rope_style="normal")
    assert np.abs(unpermuted.forward(tokens) - expected).max() > 0.1


@pytest.fixture(scope="module")
def qwen_deci(qwen05: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen05 rewritten to deci with nothing pruned."""
    out = tmp_path_factory.mktemp("qwen") / "qwen05-deci.gguf"
    result = prune_gguf(qwen05, out, [])
    assert len(result.permuted_tensors) == 4 * 24  # q/k weights and q/k biases of every layer
    return out


def test_permuted_rows_with_normal_rope_give_the_same_scores(qwen05: Path, qwen_deci: Path) -> None:
    original, rewritten = GGUFFile(qwen05), GGUFFile(qwen_deci)
    n_head, n_head_kv = original.arch_value("attention.head_count"), original.arch_value("attention.head_count_kv")
    d = original.arch_value("embedding_length") // n_head
    base = original.arch_value("rope.freq_base")

    # every tensor other than Q/K weights and biases is byte-identical; those are whole rows reordered
    def raw(model: GGUFFile, name: str) -> np.ndarray:
        span = model.tensor_span(name)
        with open(model.path, "rb") as handle:
            handle.seek(span.data_offset)
            return np.frombuffer(handle.read(span.n_bytes), dtype=np.uint8)

    for name in original.tensor_names():
        assert rewritten.tensor_span(name).tensor_type == original.tensor_span(name).tensor_type
        before, after = raw(original, name), raw(rewritten, name)
        if name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = n_head if ".attn_q." in name else n_head_kv
            # normal-RoPE row 2i of a head is NEOX row i, row 2i + 1 is NEOX row i + d/2
            order = [h * d + i + half * (d // 2) for h in range(heads) for i in range(d // 2) for half in (0, 1)]
            rows = before.reshape(heads * d, -1)
            assert after.tobytes() == rows[order].tobytes(), name
        else:
            assert after.tobytes() == before.tobytes(), name

    rng = np.random.default_rng(0)
    positions = [0, 1, 5, 17, 300, 4000]
    angles = rope_angles(positions, d, base)
    x = rng.standard_normal((len(positions), original.arch_value("embedding_length")))
    group = n_head // n_head_kv
    for layer in (0, 11, 23):
        def projections(model: GGUFFile) -> tuple[np.ndarray, np.ndarray]:
            def project(name: str, heads: int) -> np.ndarray:
                w = model.tensor(f"blk.{layer}.{name}.weight").astype(np.float64)
                b = model.tensor(f"blk.{layer}.{name}.bias").astype(np.float64)
                return (x @ w.T + b).reshape(len(positions), heads, d)

            return project("attn_q", n_head), project("attn_k", n_head_kv)

        def scores(q: np.ndarray, k: np.ndarray, rope) -> np.ndarray:
            q, k = rope(q, angles), rope(k, angles)
            return np.stack([q[:, h] @ k[:, h // group].T for h in range(n_head)])

        q_original, k_original = projections(original)
        expected = scores(q_original, k_original, rope_neox)
        got = scores(*projections(rewritten), rope_normal)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())
        # and the same rows without reordering do not give these scores: the test can fail
        unpermuted = scores(q_original, k_original, rope_normal)
        assert np.abs(unpermuted - expected).max() > 1e-3 * np.abs(expected).max()


def _logits(path: Path, tokens: list[int], flash_attn: bool) -> np.ndarray:
    model = llama_cpp.Llama(
        model_path=str(path), n_ctx=N_TOKENS, n_batch=N_TOKENS, logits_all=True,
        flash_attn=flash_attn, verbose=False, n_threads=2,
    )
    model.eval(tokens)
    logits = np.array(model.scores[: len(tokens)], dtype=np.float32)
    model.close()
    return logits


def _wikitext_tokens(model_path: Path, wikitext: Path) -> list[int]:
    text = wikitext.read_text(encoding="utf-8")[:20000]
    vocab_only = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    tokens = vocab_only.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:N_TOKENS]
    vocab_only.close()
    assert len(tokens) == N_TOKENS
    return tokens


def _deviation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |delta logit|, top-1 agreement in percent)."""
    return float(np.abs(a - b).max()), float(100.0 * np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


@pytest.mark.slow
def test_rewrite_stays_within_the_models_own_noise_floor(qwen05: Path, qwen_deci: Path, wikitext: Path) -> None:
    tokens = _wikitext_tokens(qwen05, wikitext)
    original_fa_off = _logits(qwen05, tokens, flash_attn=False)
    floor_max, floor_top1 = _deviation(_logits(qwen05, tokens, flash_attn=True), original_fa_off)
    rewrite_max, rewrite_top1 = _deviation(_logits(qwen_deci, tokens, flash_attn=False), original_fa_off)
    print(f"floor (FA on vs off): max|d| {floor_max:.3f}, top-1 {floor_top1:.2f}%; "
          f"rewrite vs original (FA off): max|d| {rewrite_max:.3f}, top-1 {rewrite_top1:.2f}%")
    assert rewrite_top1 >= floor_top1 - 1.0
    assert rewrite_max <= 1.5 * floor_max


def test_gemma3_is_refused_with_the_reason(gemma3: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "gatenorm_edge", "prune", str(gemma3), str(out), "--layers", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2 and not out.exists()
    assert "cannot prune architecture 'gemma3': sandwich norms" in proc.stderr
    assert "q/k norms" in proc.stderr
