"""One model description: the shape a GGUF's metadata (or an HF ``config.json``) gives, read once.
A mixture-of-experts model is refused here, for every command.

Every module that needs a layer count, a width, per-layer head counts, a head size, the RoPE settings
or the training context takes them from a ``ModelGeometry``; nothing else reads those metadata keys.
Head counts are per layer: a scalar in the file applies to every layer, and a ``deci`` file written
by ``prune`` has arrays (0 query heads: attention-free; 0 KV heads: linear attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import GatenormError
from ..gguf_layout import GGUFLayout
from .architectures import refuse_mixture_of_experts


class ArchMetadata(Protocol):
    """What reading a geometry needs: a path for messages and architecture-scoped values."""

    path: Path

    @property
    def architecture(self) -> str: ...

    def arch_value(self, suffix: str, default: Any = None) -> Any: ...


def _positive(where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value <= 0:
        raise GatenormError(f"{where}: {key} must be a positive integer, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ModelGeometry:
    """Layer count, width, per-layer head counts and sizes, RoPE and context of one model."""

    architecture: str
    n_layers: int
    n_embd: int
    head_count: tuple[int, ...]
    head_count_kv: tuple[int, ...]
    head_dim: int
    value_dim: int
    n_rot: int
    context_length: int | None = None
    norm_eps: float | None = None
    rope_base: float = 10000.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    window: int | None = None  # attention.sliding_window: a windowed layer sees the last ``window`` tokens
    windowed: tuple[int, ...] = ()  # the layers attention.sliding_window_pattern marks 1 (granite_swa)

    @classmethod
    def from_gguf(cls, model: ArchMetadata) -> ModelGeometry:
        """Read from GGUF metadata (``{arch}.block_count``, ``{arch}.attention.head_count``, ...)."""
        where, arch = str(model.path), model.architecture
        refuse_mixture_of_experts(model.arch_value("expert_count", 0), where)

        def required(suffix: str) -> Any:
            value = model.arch_value(suffix)
            if value is None:
                raise GatenormError(f"{where}: metadata key {arch}.{suffix} is missing")
            return value

        n_layers = _positive(where, f"{arch}.block_count", required("block_count"))
        n_embd = _positive(where, f"{arch}.embedding_length", required("embedding_length"))

        def per_layer(suffix: str, value: Any) -> tuple[int, ...]:
            if isinstance(value, list):
                if len(value) != n_layers:
                    raise GatenormError(f"{where}: {arch}.{suffix} has {len(value)} entries, not {n_layers}")
                return tuple(int(v) for v in value)
            return (int(value),) * n_layers

        raw_head_count = required("attention.head_count")
        head_count = per_layer("attention.head_count", raw_head_count)
        head_count_kv = per_layer("attention.head_count_kv", model.arch_value("attention.head_count_kv", raw_head_count))
        widest = max(head_count)  # layer 0's in any file llama.cpp can load
        key_length = model.arch_value("attention.key_length")
        if key_length is None and widest > 0 and n_embd % widest:
            raise GatenormError(f"{where}: head count {widest} does not divide the width {n_embd}")
        default_head_dim = n_embd // widest if widest else n_embd
        head_dim = int(key_length) if key_length is not None else default_head_dim
        context = model.arch_value("context_length")
        eps = model.arch_value("attention.layer_norm_rms_epsilon")
        window = model.arch_value("attention.sliding_window")
        pattern = model.arch_value("attention.sliding_window_pattern")
        windowed = per_layer("attention.sliding_window_pattern", pattern) if isinstance(pattern, list) else ()
        return cls(
            architecture=arch,
            n_layers=n_layers,
            n_embd=n_embd,
            head_count=head_count,
            head_count_kv=head_count_kv,
            head_dim=head_dim,
            value_dim=int(model.arch_value("attention.value_length", default_head_dim)),
            n_rot=int(model.arch_value("rope.dimension_count", head_dim)),
            context_length=int(context) if context is not None else None,
            norm_eps=float(eps) if eps is not None else None,
            rope_base=float(model.arch_value("rope.freq_base", 10000.0)),
            rope_scaling=str(model.arch_value("rope.scaling.type", "none")),
            rope_scaling_factor=float(model.arch_value("rope.scaling.factor", 1.0) or 1.0),
            window=int(window) if window is not None else None,
            windowed=tuple(layer for layer, flag in enumerate(windowed) if flag),
        )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], architecture: str, where: str) -> ModelGeometry:
        """Read from an HF ``config.json`` (already narrowed to its text model where it has one)."""
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
            if key not in config:
                raise GatenormError(f"{where}: {key} is missing")
        n_layers = _positive(where, "layer count", config["num_hidden_layers"])
        n_embd = _positive(where, "width", config["hidden_size"])
        n_head = config["num_attention_heads"]
        n_head_kv = config.get("num_key_value_heads") or n_head
        for key, value in (("head count", n_head), ("KV head count", n_head_kv)):
            if isinstance(value, list | tuple):
                raise GatenormError(f"{where}: per-layer {key}s are not supported")
            _positive(where, key, value)
        head_dim = config.get("head_dim")
        if head_dim is None:
            if n_embd % n_head:
                raise GatenormError(f"{where}: head count {n_head} does not divide the width {n_embd}")
            head_dim = n_embd // n_head
        head_dim = _positive(where, "head size", head_dim)
        for key in ("num_local_experts", "num_experts", "n_routed_experts"):
            refuse_mixture_of_experts(config.get(key), where)
        return cls(
            architecture=architecture,
            n_layers=n_layers,
            n_embd=n_embd,
            head_count=(int(n_head),) * n_layers,
            head_count_kv=(int(n_head_kv),) * n_layers,
            head_dim=head_dim,
            value_dim=head_dim,
            n_rot=head_dim,
            context_length=config.get("max_position_embeddings"),
        )

    @property
    def attention_free(self) -> list[int]:
        """Layers with no attention at all (0 query heads)."""
        return [i for i, heads in enumerate(self.head_count) if heads == 0]

    @property
    def linear_attention(self) -> list[int]:
        """Layers whose attention is deci's linear stand-in (query heads but 0 KV heads)."""
        return [i for i in range(self.n_layers) if self.head_count[i] > 0 and self.head_count_kv[i] == 0]

    def uniform_heads(self, where: str) -> tuple[int, int]:
        """The one (query, KV) head count of every layer; an error for per-layer counts or bad grouping."""
        if len(set(self.head_count)) > 1 or len(set(self.head_count_kv)) > 1:
            raise GatenormError(f"{where}: per-layer head counts (an already pruned file) are not supported here")
        n_head, n_head_kv = self.head_count[0], self.head_count_kv[0]
        if n_head <= 0 or n_head_kv <= 0:
            raise GatenormError(f"{where}: head counts must be positive, got {n_head} and {n_head_kv}")
        if n_head % n_head_kv:
            raise GatenormError(f"{where}: KV head count {n_head_kv} does not divide head count {n_head}")
        return n_head, n_head_kv


def gguf_geometry(path: Path | str) -> ModelGeometry:
    """The geometry of a GGUF file (the first of a split set) from its header alone."""
    with GGUFLayout(path) as model:
        return ModelGeometry.from_gguf(model)
