"""prune --mode fold-vo|linear: deci linear-attention layers load in llama.cpp, match the NumPy reference,
hold the matrices they should, and bad requests fail in one line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

from gatenorm_edge.recovery import fit_linear_maps, fold_vo_matrix, prune_with_recovery
from gatenorm_edge.reference import ReferenceModel, rms_norm
from gatenorm_edge.inspection import attention_cost
from gatenorm_edge.rewrite import prune_gguf
from gatenorm_edge.rewrite_plan import linear_tensor_type
from gatenorm_edge.sources.gguf_file import GGUFFile
from cli_helpers import assert_one_line_error, llama_cpp_logits, run_cli, run_cli_here

TOKENS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267]
LAYERS = [2, 3]


def dense_fold_vo(model: GGUFFile, layer: int, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """sum over query heads h of W_O[:, head h] @ W_V[rows of KV head h // group], in float64."""
    w_v = model.tensor(f"blk.{layer}.attn_v.weight").astype(np.float64)
    w_o = model.tensor(f"blk.{layer}.attn_output.weight").astype(np.float64)
    d = w_o.shape[1] // n_heads
    total = np.zeros((w_o.shape[0], w_v.shape[1]))
    for h in range(n_heads):
        kv = h // (n_heads // n_kv_heads)
        total += w_o[:, h * d : (h + 1) * d] @ w_v[kv * d : (kv + 1) * d, :]
    return total


def tensor_f32(path: Path, name: str) -> np.ndarray:
    tensor = next(t for t in GGUFReader(path).tensors if t.name == name)
    assert tensor.tensor_type == GGMLQuantizationType.F32
    return np.array(tensor.data, dtype=np.float64).reshape([int(d) for d in reversed(tensor.shape)])


# ----------------------------------------------------------------------------------------------
# fold-vo: the matrix itself


def test_fold_vo_matrix_equals_dense_per_head_sum_and_one_token_attention(stories260k: Path) -> None:
    model = GGUFFile(stories260k)
    reference = ReferenceModel(model)
    for layer in LAYERS:
        folded = fold_vo_matrix(model, layer)
        np.testing.assert_allclose(folded, dense_fold_vo(model, layer, 8, 4), rtol=1e-12, atol=1e-12)
        # a lone token attends only to itself: attention output == W_O W_V attn_norm(x) exactly
        x = reference.weight("token_embd.weight")[[TOKENS[3]]]
        normed = rms_norm(x, reference.weight(f"blk.{layer}.attn_norm.weight"), reference.args.norm_eps)
        attention = reference.attention(normed, layer, np.zeros((1, reference.args.head_dim // 2)))
        np.testing.assert_allclose(normed @ folded.T, attention, rtol=1e-10, atol=1e-12)


def test_fold_vo_file_holds_alpha_times_the_matrix(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "folded.gguf"
    result, report = prune_with_recovery(stories260k, out, LAYERS, "fold-vo", alpha=0.5)
    assert result.linear_layers == LAYERS and result.layers_pruned == [] and report.alpha == 0.5
    dst = GGUFReader(out)
    fields = {k: f.contents() for k, f in dst.fields.items() if not k.startswith("GGUF.")}
    assert fields["deci.attention.head_count"] == [8] * 5
    assert fields["deci.attention.head_count_kv"] == [4, 4, 0, 0, 4]
    assert fields["gatenorm.linear_layers"] == LAYERS and fields["gatenorm.mode"] == "fold-vo"
    names = {t.name for t in dst.tensors}
    for layer in LAYERS:
        assert {n for n in names if n.startswith(f"blk.{layer}.attn")} == {
            f"blk.{layer}.attn_norm.weight", f"blk.{layer}.attn_output.weight"
        }
        expected = 0.5 * dense_fold_vo(GGUFFile(stories260k), layer, 8, 4)
        np.testing.assert_allclose(tensor_f32(out, f"blk.{layer}.attn_output.weight"), expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(
            tensor_f32(out, f"blk.{layer}.attn_norm.weight"), tensor_f32(stories260k, f"blk.{layer}.attn_norm.weight")
        )
    cost = attention_cost(out)
    assert (cost.attention, cost.linear, cost.free) == ([0, 1, 4], LAYERS, [])
    assert cost.flops == 3 * 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64) + 2 * 2 * 64 * 64
    assert cost.kv_bytes == 3 * 2 * 32 * 2


# ----------------------------------------------------------------------------------------------
# both modes in llama.cpp vs the NumPy reference with the same linear layers


@pytest.mark.slow
def test_linear_layers_in_llama_cpp_match_reference(stories260k: Path, tinystories: Path, tmp_path: Path) -> None:
    source = GGUFFile(stories260k)
    reference = ReferenceModel(source)
    full = reference.forward(TOKENS)
    dropped = reference.forward(TOKENS, skip_attention=LAYERS)
    folded = tmp_path / "folded.gguf"
    prune_with_recovery(stories260k, folded, LAYERS, "fold-vo", alpha=0.75)
    patched = tmp_path / "linear.gguf"
    _, report = prune_with_recovery(
        stories260k, patched, LAYERS, "linear", calib_text=tinystories, calib_tokens=512, calib_ctx=128
    )
    cases = {
        folded: {layer: 0.75 * dense_fold_vo(source, layer, 8, 4) for layer in LAYERS},
        patched: {layer: tensor_f32(patched, f"blk.{layer}.attn_output.weight") for layer in LAYERS},
    }
    for path, matrices in cases.items():
        expected = reference.forward(TOKENS, linear_attention=matrices)
        got = llama_cpp_logits(path, TOKENS)
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert np.abs(got - dropped).max() > 0.1 and np.abs(got - full).max() > 0.1  # the layers do something
        # the reference reading the rewritten file (head_count_kv 0 -> linear) runs the stored matrices
        stored = {layer: tensor_f32(path, f"blk.{layer}.attn_output.weight") for layer in LAYERS}
        np.testing.assert_allclose(
            ReferenceModel.from_gguf(path).forward(TOKENS), reference.forward(TOKENS, linear_attention=stored), atol=1e-12
        )
    assert [fit.layer for fit in report.fits] == LAYERS


# ----------------------------------------------------------------------------------------------
# linear: the least-squares fit


def test_linear_fit_is_the_ridge_optimum_and_beats_drop(stories260k: Path) -> None:
    reference = ReferenceModel.from_gguf(stories260k)
    rng = np.random.default_rng(0)
    sequences = [np.concatenate([[1], rng.integers(2, 512, 63)]) for _ in range(4)]
    ridge = 1e-3
    maps, fits = fit_linear_maps(reference, LAYERS, sequences, ridge=ridge)
    for fit in fits:
        earlier = {layer: maps[layer] for layer in LAYERS if layer < fit.layer}
        inputs, targets = [], []
        for sequence in sequences:  # states recomputed independently with the full forward pass
            states = reference.forward_pass(sequence, linear_attention=earlier)
            norm = reference.weight(f"blk.{fit.layer}.attn_norm.weight")
            inputs.append(rms_norm(states.layer_inputs[fit.layer], norm, reference.args.norm_eps))
            targets.append(states.attention_outputs[fit.layer])
        x, y, w = np.concatenate(inputs), np.concatenate(targets), maps[fit.layer]
        residual = float(np.sum((y - x @ w.T) ** 2) / np.sum(y * y))
        assert residual == pytest.approx(fit.residual, rel=1e-9)
        assert residual < 0.9  # drop leaves all of it (1.0)
        # ridge normal equations: X^T (Y - X W^T) = lam W^T with lam = ridge * mean diag(X^T X)
        lam = ridge * np.trace(x.T @ x) / x.shape[1]
        np.testing.assert_allclose(x.T @ (y - x @ w.T), lam * w.T, atol=1e-8 * np.abs(x.T @ y).max())


def test_new_tensor_type_follows_the_source_where_gguf_can_quantize() -> None:
    assert linear_tensor_type(GGMLQuantizationType.F32, 64) == GGMLQuantizationType.F32
    assert linear_tensor_type(GGMLQuantizationType.Q4_1, 576) == GGMLQuantizationType.Q4_1
    assert linear_tensor_type(GGMLQuantizationType.Q8_0, 576) == GGMLQuantizationType.Q8_0
    assert linear_tensor_type(GGMLQuantizationType.Q4_K, 1536) == GGMLQuantizationType.Q8_0  # gguf cannot quantize Q4_K
    assert linear_tensor_type(GGMLQuantizationType.Q4_K, 48) == GGMLQuantizationType.F16  # rows not in 32-wide blocks


@pytest.mark.slow
def test_quantized_fold_vo_loads_and_stays_close(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "smol-folded.gguf"
    result = prune_gguf(smollm2, out, [29], linear_maps=lambda layer: fold_vo_matrix(GGUFFile(smollm2), layer))
    assert result.linear_tensor_type == "Q4_1"
    written = GGUFFile(out).tensor("blk.29.attn_output.weight").astype(np.float64)
    exact = fold_vo_matrix(GGUFFile(smollm2), 29)
    assert np.linalg.norm(written - exact) < 0.1 * np.linalg.norm(exact)  # 4-bit rounding, not a different matrix
    model = llama_cpp.Llama(model_path=str(out), n_ctx=32, verbose=False, n_threads=2)
    model.eval([1, 504, 3287, 314])
    assert np.isfinite(np.array(model.scores[:4])).all()
    model.close()


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit != 0, no output


def assert_refused(result: subprocess.CompletedProcess[str], out: Path, *needles: str) -> None:
    assert_one_line_error(result, *needles)
    assert not out.exists() and not list(out.parent.glob(".*"))


def test_cli_refuses_bad_recovery_requests(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.\n")
    assert_refused(
        run_cli("prune", stories260k, out, "--layers", "2", "--mode", "fold-vo", "--alpha-search", short), out, "too short"
    )
    assert_refused(run_cli_here("prune", stories260k, out, "--layers", "2", "--mode", "bogus"), out, "--mode")
    assert_refused(run_cli_here("prune", stories260k, out, "--layers", "2", "--mode", "linear"), out, "--calib")
    assert_refused(run_cli_here("prune", stories260k, out, "--layers", "2", "--alpha", "0.5"), out, "fold-vo")
    assert_refused(
        run_cli("prune", stories260k, out, "--layers", "2", "--mode", "linear", "--calib", short), out, "calibration"
    )


def test_cli_refuses_mode_on_unsupported_architecture(gemma3: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    assert_refused(run_cli_here("prune", gemma3, out, "--layers", "3", "--mode", "fold-vo"), out, "gemma3")
    assert_refused(run_cli_here("prune", gemma3, out, "--layers", "3", "--mode", "linear", "--calib", gemma3), out, "gemma3")


def test_compare_and_inspect_show_the_cost_of_each_mode(stories260k: Path, tinystories: Path, tmp_path: Path) -> None:
    from gatenorm_edge.harness.compare import compare
    from gatenorm_edge.report import compare_markdown

    dropped, folded = tmp_path / "drop.gguf", tmp_path / "fold.gguf"
    prune_with_recovery(stories260k, dropped, LAYERS, "drop")
    prune_with_recovery(stories260k, folded, LAYERS, "fold-vo")
    per_layer_attention = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64)
    costs = {path: attention_cost(path).to_dict()["per_token"] for path in (stories260k, dropped, folded)}
    assert costs[stories260k]["flops"] == 5 * per_layer_attention
    assert costs[dropped]["flops"] == 3 * per_layer_attention
    assert costs[folded]["flops"] == 3 * per_layer_attention + 2 * 2 * 64 * 64
    assert costs[dropped]["kv_bytes"] == costs[folded]["kv_bytes"] == 3 * 2 * 32 * 2
    assert costs[dropped]["flops_per_context_token"] == costs[folded]["flops_per_context_token"] == 3 * 4 * 8 * 8
    result = compare(stories260k, folded, tinystories, ctx=64, chunks=2, speed=None)
    assert result.to_dict()["attention_cost"]["pruned"]["per_token"] == costs[folded]  # the compare --json contract
    table = compare_markdown(result)
    assert "| attention layers | 5 attention, 0 linear, 0 free | 3 attention, 2 linear, 0 free |" in table
    inspected = run_cli_here("inspect", folded)
    assert inspected.returncode == 0 and "| attention layers | 3 attention, 2 linear, 0 free |" in inspected.stdout
    assert f"| attention FLOPs/token (matrices) | {costs[folded]['flops']:,} |" in inspected.stdout
