"""The NumPy reference forward pass: RoPE from first principles, and agreement with llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gatenorm_edge.reference import ReferenceModel, rope_angles, rope_neox, rope_normal
from gatenorm_edge.rewrite import prune_gguf
from cli_helpers import llama_cpp_logits

TOKENS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267]
GGML_TYPE_F32 = 0


def rotate_pairs_by_complex(x: np.ndarray, angles: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """RoPE as its definition says: each (a, b) pair is a complex number multiplied by e^(i*theta)."""
    out = x.copy()
    for i, (a, b) in enumerate(pairs):
        z = (x[..., a] + 1j * x[..., b]) * np.exp(1j * angles[:, i])[:, None]
        out[..., a], out[..., b] = z.real, z.imag
    return out


def test_rope_matches_complex_rotation_definition() -> None:
    rng = np.random.default_rng(0)
    d = 16
    x = rng.standard_normal((5, 3, d))
    angles = rope_angles(range(5), d, 10000.0)
    normal_pairs = [(2 * i, 2 * i + 1) for i in range(d // 2)]
    neox_pairs = [(i, i + d // 2) for i in range(d // 2)]
    np.testing.assert_allclose(rope_normal(x, angles), rotate_pairs_by_complex(x, angles, normal_pairs), atol=1e-12)
    np.testing.assert_allclose(rope_neox(x, angles), rotate_pairs_by_complex(x, angles, neox_pairs), atol=1e-12)
    # angle of pair i at position p is p * base^(-2i/d)
    assert np.isclose(angles[3, 2], 3 * 10000.0 ** (-4 / d))


def test_rope_scores_depend_only_on_relative_position() -> None:
    rng = np.random.default_rng(1)
    d = 8
    q, k = rng.standard_normal((1, 1, d)), rng.standard_normal((1, 1, d))
    for rope in (rope_normal, rope_neox):
        scores = []
        for shift in (0, 7, 30):
            qa = rope(q, rope_angles([shift + 5], d, 10000.0))
            ka = rope(k, rope_angles([shift + 2], d, 10000.0))
            scores.append(float((qa * ka).sum()))
        np.testing.assert_allclose(scores, scores[0], rtol=1e-12)


@pytest.mark.slow
def test_reference_matches_llama_cpp_unpruned_and_pruned(stories260k: Path, tmp_path: Path) -> None:
    reference = ReferenceModel.from_gguf(stories260k)
    full = reference.forward(TOKENS)
    np.testing.assert_allclose(llama_cpp_logits(stories260k, TOKENS), full, atol=1e-4)
    for layers in ([2, 3], [1, 4]):
        out = tmp_path / f"pruned{layers[0]}{layers[1]}.gguf"
        prune_gguf(stories260k, out, layers)
        pruned = llama_cpp_logits(out, TOKENS)
        skipped = reference.forward(TOKENS, skip_attention=layers)
        np.testing.assert_allclose(pruned, skipped, atol=1e-4)
        assert np.abs(pruned - full).max() > 0.1  # skipping attention really changes the model
        # the pruned file read by the reference (head_count 0 there) is the same model
        np.testing.assert_allclose(ReferenceModel.from_gguf(out).forward(TOKENS), skipped, atol=1e-12)


def test_forward_pass_exposes_per_layer_states(stories260k: Path) -> None:
    reference = ReferenceModel.from_gguf(stories260k)
    states = reference.forward_pass(TOKENS[:6], skip_attention={2})
    assert len(states.layer_inputs) == 5 and len(states.attention_outputs) == 5
    assert states.attention_outputs[2] is None
    assert all(states.attention_outputs[i].shape == (6, 64) for i in (0, 1, 3, 4))
    np.testing.assert_array_equal(states.logits, reference.forward(TOKENS[:6], skip_attention={2}))
