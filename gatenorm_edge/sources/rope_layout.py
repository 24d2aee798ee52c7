"""The one Q/K row permutation that matters: HF's half-split RoPE rows versus GGUF's interleaved rows.

HF checkpoints of llama-family models rotate pairs (i, i + d_h/2) within each head ("NEOX" layout);
llama.cpp's llama converter reorders each head's rows so that pairs are adjacent, (2i, 2i + 1), which
is the layout of llama.cpp's normal RoPE. qwen2, qwen3 and gemma3 GGUFs keep the HF order.
Both functions also accept 1-D bias vectors (rows only).
"""

from __future__ import annotations

import numpy as np


def _check(weights: np.ndarray, n_heads: int) -> int:
    rows = weights.shape[0]
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of even size")
    return rows // n_heads


def hf_to_gguf_rows(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows from HF half-split order to GGUF interleaved order."""
    head_dim = _check(weights, n_heads)
    rest = weights.shape[1:]
    return weights.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(weights.shape)


def gguf_to_hf_rows(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo :func:`hf_to_gguf_rows`: GGUF interleaved rows back to HF half-split order."""
    head_dim = _check(weights, n_heads)
    rest = weights.shape[1:]
    return weights.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weights.shape)
