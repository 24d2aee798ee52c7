"""What a GGUF holds, for people and for the harness: architecture, layers, attention-free layers, tensor
types, gatenorm provenance, and the per-token cost of its attention sublayers."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import GatenormError
from .gguf_layout import GGUFLayout
from .rewrite_plan import ATTENTION_TENSORS, PROVENANCE_PREFIX
from .sources.geometry import ModelGeometry

KV_BYTES_PER_VALUE = 2  # llama.cpp's default F16 K and V cache


@dataclass(frozen=True)
class AttentionCost:
    """Per-token cost of a file's attention sublayers as it stands, and which layers are of which kind.

    ``flops``: 2 per weight of the Q/K/V/O (or linear) matrices; ``flops_per_context_token``: the
    softmax attention's QK and AV products, 4 x heads x head size per cached token; ``weight_bytes``:
    attention tensor bytes read per token; ``kv_bytes``: K and V cache bytes added per token (F16). A
    windowed layer (granite_swa) adds to neither per-context figure: its cost and cache stop growing at
    its window.
    """

    attention: list[int]
    linear: list[int]
    free: list[int]
    windowed: list[int]
    flops: int
    flops_per_context_token: int
    weight_bytes: int
    kv_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of ``inspect`` and ``compare``: the layers by kind, then the per-token figures."""
        fields = asdict(self)
        return {
            "layers": {kind: fields.pop(kind) for kind in ("attention", "linear", "free", "windowed")},
            "per_token": fields,
        }


@dataclass
class Inspection:
    """What ``inspect`` reports about one GGUF; ``to_dict`` is the ``inspect --json`` contract."""

    file: str
    architecture: str
    name: str | None
    n_layers: int
    attention_free_layers: list[int]
    attention_layers: int
    windowed_layers: list[int]
    window: int | None
    size_bytes: int
    n_tensors: int
    tensor_types: dict[str, dict[str, int]]
    gatenorm: dict[str, Any]
    attention_cost: AttentionCost | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"attention_cost": cost_dict(self.attention_cost)}


def _geometry(model: GGUFLayout) -> ModelGeometry | None:
    """The file's geometry, or None when its metadata lacks one (inspect still reports what it can)."""
    try:
        return ModelGeometry.from_gguf(model)
    except GatenormError:
        return None


def cost_dict(cost: AttentionCost | None) -> dict[str, Any]:
    """A cost's JSON, ``{}`` for a file whose metadata has no geometry."""
    return cost.to_dict() if cost is not None else {}


def _attention_cost(model: GGUFLayout, geometry: ModelGeometry | None) -> AttentionCost | None:
    """The file's ``AttentionCost``, None when its metadata lacks a geometry."""
    if geometry is None:
        return None
    heads, kv_heads = geometry.head_count, geometry.head_count_kv
    kinds: dict[str, list[int]] = {"attention": [], "linear": [], "free": [], "windowed": []}
    cost = {"flops": 0, "flops_per_context_token": 0, "weight_bytes": 0, "kv_bytes": 0}
    for layer in range(geometry.n_layers):
        kind = "free" if heads[layer] == 0 else "linear" if kv_heads[layer] == 0 else "attention"
        kind = "windowed" if layer in geometry.windowed else kind
        kinds[kind].append(layer)
        for suffix in ATTENTION_TENSORS:
            info = model.tensors.get(f"blk.{layer}.{suffix}")
            if info is None:
                continue
            cost["weight_bytes"] += info.n_bytes
            if len(info.shape) == 2:
                cost["flops"] += 2 * int(info.shape[0]) * int(info.shape[1])
        if kind == "attention":
            cost["flops_per_context_token"] += 4 * heads[layer] * geometry.head_dim
            cost["kv_bytes"] += 2 * kv_heads[layer] * geometry.head_dim * KV_BYTES_PER_VALUE
    return AttentionCost(**kinds, **cost)


def attention_cost(path: Path | str) -> AttentionCost | None:
    """Per-token FLOPs, weight bytes and KV bytes of a file's attention sublayers (see ``inspect_gguf``)."""
    with GGUFLayout(path) as model:
        return _attention_cost(model, _geometry(model))


def attention_free_layers(path: Path | str) -> list[int]:
    """Layers whose per-layer ``head_count`` is 0 (only files written by ``prune`` have any)."""
    with GGUFLayout(path) as model:
        geometry = _geometry(model)
        return geometry.attention_free if geometry is not None else []


def inspect_gguf(path: Path | str) -> Inspection:
    """Architecture, layers, attention-free layers, size, tensor types, gatenorm provenance, attention cost."""
    with GGUFLayout(path) as model:
        geometry = _geometry(model)
        n_layers = geometry.n_layers if geometry is not None else int(model.arch_value("block_count", 0) or 0)
        free = geometry.attention_free if geometry is not None else []
        types: Counter[str] = Counter()
        type_bytes: Counter[str] = Counter()
        for info in model.tensors.values():
            types[info.tensor_type.name] += 1
            type_bytes[info.tensor_type.name] += info.n_bytes
        provenance = {
            key[len(PROVENANCE_PREFIX):]: model.value(key)
            for key in model.fields
            if key.startswith(PROVENANCE_PREFIX)
        }
        return Inspection(
            file=str(path),
            architecture=model.architecture,
            name=model.value("general.name"),
            n_layers=n_layers,
            attention_free_layers=free,
            attention_layers=n_layers - len(free),
            windowed_layers=list(geometry.windowed) if geometry is not None else [],
            window=geometry.window if geometry is not None and geometry.windowed else None,
            size_bytes=model.size,
            n_tensors=sum(types.values()),
            tensor_types={name: {"count": types[name], "bytes": type_bytes[name]} for name in sorted(types)},
            gatenorm=provenance,
            attention_cost=_attention_cost(model, geometry),
        )
