"""A float64 NumPy forward pass for llama-family GGUF weights: the independent reference.

Written from the architecture, not from llama.cpp's code: token embedding, then per layer
``x = x + attention(rms_norm(x))`` and ``x = x + swiglu_ffn(rms_norm(x))``, a final RMSNorm and the
output projection (tied to the embedding when ``output.weight`` is absent). Attention is causal,
with grouped-query heads, RoPE and optional q/k/v/o biases (qwen2). Obviously correct beats fast:
weights are dequantized on demand, one tensor at a time, so memory follows the largest tensor.

Conventions follow the GGUF file: weight matrices are (out_features, in_features); ``llama`` and
``deci`` files store Q/K rows for normal RoPE (rotating adjacent pairs), ``qwen2`` for NEOX RoPE
(rotating dimension i with i + d/2). A ``deci`` layer with ``head_count > 0`` and ``head_count_kv == 0``
is "linear attention": its attention sublayer is ``attn_output.weight @ rms_norm(x)``, a per-token map.
A ``granite_swa`` file's windowed layers let a query at position p see keys p - W + 1 .. p only, and a
layer's per-head sink logit (``attn_sinks``) joins each softmax denominator with no value of its own.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import GatenormError
from .sources.architectures import known_architecture
from .sources.geometry import ModelGeometry
from .sources.gguf_file import GGUFFile

@dataclass(frozen=True)
class ModelArgs:
    """The hyperparameters the forward pass needs, read from GGUF metadata."""

    n_layers: int
    n_embd: int
    head_dim: int
    n_heads: list[int]
    n_kv_heads: list[int]
    norm_eps: float
    rope_base: float
    rope_style: str
    window: int | None = None
    windowed: frozenset[int] = frozenset()

    @classmethod
    def from_gguf(cls, model: GGUFFile) -> ModelArgs:
        arch = known_architecture(model.architecture, str(model.path))
        if not arch.llama_block:  # the forward pass is the plain llama block, with either RoPE
            raise GatenormError(f"the reference forward pass covers llama, deci, qwen2 and granite_swa, not '{arch.name}'")
        g = ModelGeometry.from_gguf(model)
        if g.rope_scaling not in ("none", "linear") or g.rope_scaling_factor != 1.0:
            raise GatenormError(
                f"RoPE scaling '{g.rope_scaling}' (factor {g.rope_scaling_factor}) is not in the reference forward pass"
            )
        if g.norm_eps is None:
            raise GatenormError(f"{model.path}: metadata key {arch.name}.attention.layer_norm_rms_epsilon is missing")
        return cls(
            n_layers=g.n_layers,
            n_embd=g.n_embd,
            head_dim=g.head_dim,
            n_heads=list(g.head_count),
            n_kv_heads=list(g.head_count_kv),
            norm_eps=g.norm_eps,
            rope_base=g.rope_base,
            rope_style=arch.rope_style,
            window=g.window,
            windowed=frozenset(g.windowed),
        )


@dataclass
class ForwardPass:
    """Logits and, per layer, the residual stream entering it and its attention sublayer's output."""

    logits: np.ndarray
    layer_inputs: list[np.ndarray] = field(default_factory=list)
    attention_outputs: list[np.ndarray | None] = field(default_factory=list)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, sink: float | None = None) -> np.ndarray:
    """Softmax over the last axis; a ``sink`` logit joins every row's denominator, with no value of its own."""
    if sink is None:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    top = np.maximum(x.max(axis=-1, keepdims=True), sink)
    e = np.exp(x - top)
    return e / (e.sum(axis=-1, keepdims=True) + np.exp(sink - top))


def rope_angles(positions: Sequence[int], head_dim: int, base: float, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """Angle p * base^(-2i/d) (divided by optional llama3-style factors), shape (positions, d/2)."""
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors
    return np.outer(np.asarray(positions, dtype=np.float64), inv_freq)


def rope_normal(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Normal (GPT-J) RoPE: rotate adjacent pairs (2i, 2i+1). x: (tokens, heads, d)."""
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def rope_neox(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """NEOX RoPE: rotate dimension i with i + d/2. x: (tokens, heads, d)."""
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


ROPE = {"normal": rope_normal, "neox": rope_neox}


class ReferenceModel:
    """Float64 forward pass over a llama/qwen2/deci GGUF file's dequantized weights."""

    def __init__(self, model: GGUFFile) -> None:
        self.model = model
        self.args = ModelArgs.from_gguf(model)

    @classmethod
    def from_gguf(cls, path: Path | str) -> ReferenceModel:
        return cls(GGUFFile(path))

    def weight(self, name: str) -> np.ndarray:
        return self.model.tensor(name).astype(np.float64)

    def optional(self, name: str) -> np.ndarray | None:
        return self.weight(name) if self.model.has_tensor(name) else None

    def linear(self, x: np.ndarray, prefix: str) -> np.ndarray:
        """x @ W.T (+ b) for ``prefix.weight`` and an optional ``prefix.bias``."""
        y = x @ self.weight(f"{prefix}.weight").T
        bias = self.optional(f"{prefix}.bias")
        return y if bias is None else y + bias

    def attention(self, x: np.ndarray, layer: int, angles: np.ndarray) -> np.ndarray:
        a, blk = self.args, f"blk.{layer}"
        n_tokens, n_heads, n_kv_heads, d = x.shape[0], a.n_heads[layer], a.n_kv_heads[layer], a.head_dim
        rope = ROPE[a.rope_style]
        q = rope(self.linear(x, f"{blk}.attn_q").reshape(n_tokens, n_heads, d), angles)
        k = rope(self.linear(x, f"{blk}.attn_k").reshape(n_tokens, n_kv_heads, d), angles)
        v = self.linear(x, f"{blk}.attn_v").reshape(n_tokens, n_kv_heads, d)
        distance = np.arange(n_tokens)[:, None] - np.arange(n_tokens)[None, :]  # query position - key position
        visible = distance >= 0
        if layer in a.windowed:
            visible &= distance < a.window  # a windowed query sees itself and the window - 1 tokens before it
        mask = np.where(visible, 0.0, -np.inf)
        sinks = self.optional(f"{blk}.attn_sinks.weight")
        group = n_heads // n_kv_heads
        heads = []
        for h in range(n_heads):
            kv = h // group
            scores = q[:, h, :] @ k[:, kv, :].T / np.sqrt(d) + mask
            heads.append(softmax(scores, None if sinks is None else sinks[h]) @ v[:, kv, :])
        return self.linear(np.concatenate(heads, axis=-1), f"{blk}.attn_output")

    def feed_forward(self, x: np.ndarray, layer: int) -> np.ndarray:
        blk = f"blk.{layer}"
        return self.linear(silu(self.linear(x, f"{blk}.ffn_gate")) * self.linear(x, f"{blk}.ffn_up"), f"{blk}.ffn_down")

    def embed(self, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The residual stream entering layer 0 and the RoPE angles for positions 0..n-1."""
        a = self.args
        tokens = np.asarray(tokens, dtype=np.int64)
        angles = rope_angles(range(len(tokens)), a.head_dim, a.rope_base, self.optional("rope_freqs.weight"))
        return self.weight("token_embd.weight")[tokens], angles

    def ffn_sublayer(self, x: np.ndarray, layer: int) -> np.ndarray:
        """The residual stream after ``layer``'s feed-forward sublayer."""
        return x + self.feed_forward(rms_norm(x, self.weight(f"blk.{layer}.ffn_norm.weight"), self.args.norm_eps), layer)

    def attention_sublayer(
        self, x: np.ndarray, layer: int, angles: np.ndarray, linear: np.ndarray | None = None
    ) -> np.ndarray:
        """The attention sublayer's output for residual stream ``x``: softmax attention, or ``linear @ norm(x)``.

        ``linear`` (n_embd x n_embd) replaces the layer's attention; without it a file's linear-attention
        layer (head_count_kv 0) uses its own ``attn_output.weight``.
        """
        normed = rms_norm(x, self.weight(f"blk.{layer}.attn_norm.weight"), self.args.norm_eps)
        if linear is None and self.args.n_kv_heads[layer] == 0:
            linear = self.weight(f"blk.{layer}.attn_output.weight")
        if linear is not None:
            return normed @ linear.T
        return self.attention(normed, layer, angles)

    def forward_pass(
        self,
        tokens: Sequence[int],
        skip_attention: Collection[int] = (),
        *,
        linear_attention: Mapping[int, np.ndarray] | None = None,
    ) -> ForwardPass:
        """Run the model on ``tokens`` (positions 0..n-1), skipping the listed attention sublayers.

        ``linear_attention`` maps layers to n_embd x n_embd matrices that replace their attention by
        ``W @ attn_norm(x)`` (deci linear attention).
        """
        a = self.args
        linear_attention = linear_attention or {}
        x, angles = self.embed(tokens)
        result = ForwardPass(logits=np.empty(0))
        for layer in range(a.n_layers):
            result.layer_inputs.append(x)
            attn_out = None
            if a.n_heads[layer] > 0 and layer not in skip_attention:
                attn_out = self.attention_sublayer(x, layer, angles, linear_attention.get(layer))
                x = x + attn_out
            result.attention_outputs.append(attn_out)
            x = self.ffn_sublayer(x, layer)
        x = rms_norm(x, self.weight("output_norm.weight"), a.norm_eps)
        output = "output.weight" if self.model.has_tensor("output.weight") else "token_embd.weight"
        result.logits = x @ self.weight(output).T
        return result

    def forward(
        self,
        tokens: Sequence[int],
        skip_attention: Collection[int] = (),
        *,
        linear_attention: Mapping[int, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Logits (n_tokens x vocab, float64) with the listed attention sublayers skipped or made linear."""
        return self.forward_pass(tokens, skip_attention, linear_attention=linear_attention).logits
