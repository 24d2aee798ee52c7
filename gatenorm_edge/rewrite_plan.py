"""Plan a GGUF rewrite into llama.cpp's ``deci`` architecture: every decision, before a byte is written.

llama.cpp's ``deci`` graph skips a layer's attention sublayer when the per-layer array
``deci.attention.head_count`` holds 0 there, and then that layer must carry no attention tensors.
``llama`` files become ``deci`` files by renaming their ``llama.*`` keys; ``qwen2`` files also need
their Q/K rows reordered within each head, because ``deci`` applies normal (GPT-J style) RoPE to
adjacent pairs while qwen2 files are laid out for NEOX RoPE, which pairs dimension i with i + d/2.

Layers can instead become ``deci`` "linear attention" (``head_count > 0``, ``head_count_kv == 0``):
llama.cpp then computes ``x + attn_output @ attn_norm(x)`` there, with no KV cache. Such a layer keeps
its ``attn_norm``; its new n_embd x n_embd ``attn_output`` is written in the source's ``attn_output``
type where ``gguf.quants`` can quantize to it, else Q8_0 (never F16, which would read more bytes per token
than the attention it replaces: a K-quant source such as Q4_K_M gets Q8_0). Stock llama.cpp applies no bias on that
path, so none is written. The plan holds the output's whole header; ``rewrite`` streams the tensors.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_VERSION, GGMLQuantizationType, GGUFValueType, Keys
from gguf.quants import QuantError, dequantize, quantize

from . import __version__
from .errors import GatenormError
from .gguf_layout import GGUF_MAGIC, GGUFLayout, TensorSpan
from .sources.architectures import prunable_architecture
from .sources.geometry import ModelGeometry

TARGET_ARCH = "deci"
PROVENANCE_PREFIX = "gatenorm."
PRUNED_LAYERS_KEY = "gatenorm.pruned_layers"
LINEAR_LAYERS_KEY = "gatenorm.linear_layers"
SOURCE_NAME_KEY = "gatenorm.source.name"
SOURCE_SHA256_KEY = "gatenorm.source.sha256"
SHA256_PLACEHOLDER = "0" * 64


# Tensor names stock llama.cpp's deci loader accepts (src/models/deci.cpp), per file and per layer.
GLOBAL_TENSORS = frozenset({"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"})
ATTENTION_TENSORS = (
    "attn_norm.weight",
    "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
    "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias",
)
FFN_TENSORS = (
    "ffn_norm.weight",
    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
    "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias",
)
ROPE_PERMUTED_TENSORS = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")
LINEAR_KEPT_TENSORS = ("attn_norm.weight", "attn_output.weight")

# A function giving the n_embd x n_embd matrix of a layer's linear attention (called once per layer while writing).
LinearMaps = Callable[[int], np.ndarray]


@dataclass
class TensorCopy:
    """One output tensor: where its bytes come from, for RoPE reordering its number of heads, and for a
    tensor computed while writing (a linear-attention matrix, attention sinks) its layer (``info`` then
    describes the new tensor, not a source)."""

    name: str
    info: TensorSpan
    out_offset: int = 0
    rope_heads: int | None = None
    computed_layer: int | None = None


@dataclass
class RewritePlan:
    """Everything needed to write the output, decided before a byte is written."""

    architecture: str
    n_layers: int
    attention_free: list[int]
    linear: list[int]
    requested: list[int]
    header: bytes
    sha256_offset: int
    alignment: int
    tensors: list[TensorCopy]
    dropped: list[TensorSpan] = field(default_factory=list)
    target: str = "deci"
    windowed: list[int] = field(default_factory=list)
    window: int | None = None

    @property
    def data_bytes(self) -> int:
        last = self.tensors[-1]
        return last.out_offset + last.info.n_bytes

    @property
    def output_bytes(self) -> int:
        return align(len(self.header), self.alignment) + self.data_bytes


# --------------------------------------------------------------------------------------------
# GGUF encoding of the few metadata values we create (everything else is copied as raw bytes)


def align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


def _encode_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def kv_string(key: str, value: str) -> bytes:
    return _encode_str(key) + struct.pack("<I", GGUFValueType.STRING) + _encode_str(value)


def kv_uint32(key: str, value: int) -> bytes:
    return _encode_str(key) + struct.pack("<II", GGUFValueType.UINT32, value)


def kv_float32(key: str, value: float) -> bytes:
    return _encode_str(key) + struct.pack("<If", GGUFValueType.FLOAT32, value)


def kv_uint32_array(key: str, values: Sequence[int]) -> bytes:
    head = _encode_str(key) + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.UINT32, len(values))
    return head + np.asarray(values, dtype="<u4").tobytes()


def _tensor_info(name: str, dims: Sequence[int], ggml_type: int, offset: int) -> bytes:
    return (
        _encode_str(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Reading what the input says about its layers


def check_single_file(model: GGUFLayout) -> None:
    if model.split_count > 1:
        raise GatenormError(
            f"{model.path}: split GGUF ({model.split_count} files); merge it first with llama-gguf-split --merge"
        )


def block_tensor(name: str) -> tuple[int, str] | None:
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None


def check_tensor_names(model: GGUFLayout, n_layers: int, target: str = TARGET_ARCH) -> None:
    """Every tensor is one a llama block in ``target`` has (deci's and granite_swa's are the same set)."""
    allowed = set(ATTENTION_TENSORS) | set(FFN_TENSORS)
    for info in model.tensors.values():
        block = block_tensor(info.name)
        ok = info.name in GLOBAL_TENSORS if block is None else (block[0] < n_layers and block[1] in allowed)
        if not ok:
            raise GatenormError(
                f"{model.path}: tensor {info.name} has no place in llama.cpp's {target} architecture; cannot rewrite this file"
            )


def check_layer_list(layers: Sequence[int], n_layers: int) -> list[int]:
    """The layers as ints, each once and within the model; one line naming the first problem otherwise."""
    requested = [int(layer) for layer in layers]
    duplicates = sorted(layer for layer, count in Counter(requested).items() if count > 1)
    if duplicates:
        raise GatenormError(f"layer(s) listed more than once: {', '.join(map(str, duplicates))}")
    out_of_range = sorted(layer for layer in requested if not 0 <= layer < n_layers)
    if out_of_range:
        raise GatenormError(
            f"layer(s) out of range: {', '.join(map(str, out_of_range))} (the model has layers 0..{n_layers - 1})"
        )
    return requested


def _validate_layers(layers: Sequence[int], n_layers: int, already_free: list[int]) -> list[int]:
    requested = check_layer_list(layers, n_layers)
    if 0 in requested:
        raise GatenormError(
            "layer 0 cannot be made attention-free: llama.cpp takes the head size from layer 0, "
            "so such a file does not load"
        )
    union = sorted(set(requested) | set(already_free))
    if requested and set(union) >= set(range(1, n_layers)):
        raise GatenormError(f"cannot remove attention from all {n_layers - 1} prunable layers (1..{n_layers - 1})")
    return union


# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# RoPE layout: qwen2 rows are laid out for NEOX RoPE (pairs i, i + d/2), deci rotates adjacent
# pairs (2i, 2i + 1). Reordering each head's rows with the llama converter's permutation
# (sources.rope_layout.hf_to_gguf_rows) on both Q and K leaves every q.k unchanged; each row is
# quantized on its own, so the reordering moves whole rows of bytes.


def row_geometry(info: TensorSpan) -> tuple[int, int]:
    """(number of rows, bytes per row) for a 2-D weight or a 1-D bias (one row per element)."""
    dims = [int(d) for d in info.shape]
    block_size, type_size = GGML_QUANT_SIZES[info.tensor_type]
    if len(dims) == 1:
        if block_size != 1:
            raise GatenormError(f"{info.name}: quantized 1-D tensor ({info.tensor_type.name}) cannot be reordered")
        return dims[0], type_size
    if len(dims) != 2 or dims[0] % block_size:
        raise GatenormError(f"{info.name}: unexpected shape {dims} for a RoPE row reordering")
    return dims[1], dims[0] // block_size * type_size


def _rope_heads(name: str, info: TensorSpan, n_head: int, n_head_kv: int, head_dim: int) -> int:
    """How many heads a Q/K tensor's rows split into (checked against its row count)."""
    n_rows, _ = row_geometry(info)
    heads = n_head if name.startswith("attn_q") else n_head_kv
    if n_rows != heads * head_dim or head_dim % 2:
        raise GatenormError(f"{info.name}: {n_rows} rows, expected {heads} heads x an even head size {head_dim}")
    return heads


# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Planning


def header_fields(
    model: GGUFLayout,
    architecture: str,
    target: str,
    replaced: dict[str, bytes],
    added: dict[str, bytes],
    source: Path,
    provenance: dict[str, str],
) -> tuple[list[bytes], int]:
    """Encoded KV pairs of the output, and where in them the source sha256 placeholder sits.

    ``architecture.*`` keys become ``target.*`` keys, copied as raw bytes unless ``replaced`` (target key ->
    encoded pair) has them; ``replaced`` pairs the source lacks come after its own, then ``added`` (gatenorm.*
    key -> encoded pair, replacing the source's), the provenance strings and the source's name and sha256.
    """
    arch_prefix = f"{architecture}."
    replaced = dict(replaced)
    rewritten = set(added) | {SOURCE_NAME_KEY, SOURCE_SHA256_KEY} | {PROVENANCE_PREFIX + k for k in provenance}
    out: list[bytes] = []
    for key, span in model.fields.items():
        if key in rewritten:
            continue
        if key == Keys.General.ARCHITECTURE:
            out.append(kv_string(key, target))
        elif key.startswith(arch_prefix):
            new_key = target + "." + key[len(arch_prefix):]
            out.append(replaced.pop(new_key) if new_key in replaced else _encode_str(new_key) + model.raw(span.value_start - 4, span.end))
        else:
            out.append(model.raw(span.start, span.end))
    out.extend(replaced.values())
    out.extend(added.values())
    for key, value in sorted(provenance.items()):
        out.append(kv_string(PROVENANCE_PREFIX + key, str(value)))
    out.append(kv_string(SOURCE_NAME_KEY, source.name))
    sha_field = kv_string(SOURCE_SHA256_KEY, SHA256_PLACEHOLDER)
    sha_offset = sum(len(chunk) for chunk in out) + len(sha_field) - len(SHA256_PLACEHOLDER)
    out.append(sha_field)
    return out, sha_offset


def with_tool(provenance: dict[str, str] | None, architecture: str, target: str) -> dict[str, str]:
    """The provenance strings every output carries: the tool, and the source's architecture when it changes."""
    provenance = dict(provenance or {})
    provenance.setdefault("tool", f"gatenorm-edge {__version__}")
    if architecture != target:
        provenance.setdefault("source.architecture", architecture)
    return provenance


def assemble_header(tensors: list[TensorCopy], kv: list[bytes], sha_offset: int, alignment: int) -> tuple[bytes, int]:
    """Give each output tensor its data offset; the whole header, and where the source sha256 sits in it."""
    offset = 0
    infos = []
    for copy in tensors:
        copy.out_offset = offset
        infos.append(_tensor_info(copy.name, [int(d) for d in copy.info.shape], int(copy.info.tensor_type), offset))
        offset = align(offset + copy.info.n_bytes, alignment)
    prefix = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kv))
    return prefix + b"".join(kv) + b"".join(infos), len(prefix) + sha_offset


def plan_rewrite(
    src: Path, layers: Sequence[int], provenance: dict[str, str] | None = None, *, linear: Collection[int] = ()
) -> RewritePlan:
    """Validate the request against the file and lay out the output, without writing anything.

    The ``linear`` ones of ``layers`` become deci linear-attention layers; the others attention-free.
    """
    with GGUFLayout(src) as model:
        return _plan(model, layers, provenance, linear)


def linear_tensor_type(source_type: GGMLQuantizationType, n_embd: int) -> GGMLQuantizationType:
    """The type a new n_embd x n_embd attn_output is written in: the source's if gguf.quants can make it, else Q8_0
    (F16 only where rows do not split into Q8_0 blocks)."""
    for candidate in (source_type, GGMLQuantizationType.Q8_0):
        try:
            quantize(np.zeros((1, n_embd), dtype=np.float32), candidate)
        except (NotImplementedError, QuantError, ValueError):
            continue
        return candidate
    return GGMLQuantizationType.F16


def attn_output_type(src: Path) -> GGMLQuantizationType:
    """The ggml type of the first layer's attention output matrix (a patch is written in the type it takes)."""
    with GGUFLayout(src) as model:
        first = min(block_tensor(name)[0] for name in model.tensors if name.endswith(".attn_output.weight"))
        return model.tensors[f"blk.{first}.attn_output.weight"].tensor_type


def as_written(matrix: np.ndarray, tensor_type: GGMLQuantizationType) -> np.ndarray:
    """``matrix`` as llama.cpp will read it back after it is written in ``tensor_type`` (float32)."""
    return dequantize(quantize(np.asarray(matrix, dtype=np.float32), tensor_type), tensor_type).astype(np.float32)


def _linear_output_span(model: GGUFLayout, layer: int, n_embd: int) -> TensorSpan:
    """Shape, type and size of layer ``layer``'s new linear-attention attn_output (not yet computed)."""
    name = f"blk.{layer}.attn_output.weight"
    if name not in model.tensors:
        raise GatenormError(f"{model.path}: {name} is missing; cannot make layer {layer} linear attention")
    tensor_type = linear_tensor_type(model.tensors[name].tensor_type, n_embd)
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    return TensorSpan(name, (n_embd, n_embd), tensor_type, -1, n_embd * n_embd // block_size * type_size)


@dataclass(frozen=True)
class _LayerChoice:
    """Which layers the output removes: attention-free ones, linear ones, and the new head counts."""

    removed: list[int]
    attention_free: list[int]
    linear: list[int]
    head_count: list[int]
    head_count_kv: list[int]


def _choose_layers(geometry: ModelGeometry, layers: Sequence[int], linear: Collection[int], src: Path) -> _LayerChoice:
    """Validate the request against the file's layers (already attention-free ones are kept so)."""
    if geometry.linear_attention:
        raise GatenormError(
            f"{src}: layer(s) {', '.join(map(str, geometry.linear_attention))} use deci linear attention; cannot prune this file"
        )
    removed = _validate_layers(layers, geometry.n_layers, geometry.attention_free)
    if not set(linear) <= set(layers):
        raise GatenormError("linear-attention layers must be among the layers removed")
    linear_layers = sorted(int(layer) for layer in linear)
    no_attention = sorted(set(linear_layers) & set(geometry.attention_free))
    if no_attention:
        raise GatenormError(
            f"layer(s) {', '.join(map(str, no_attention))} are already attention-free: no attention to make linear"
        )
    attention_free = [i for i in removed if i not in linear_layers]
    return _LayerChoice(
        removed=removed,
        attention_free=attention_free,
        linear=linear_layers,
        head_count=[0 if i in attention_free else geometry.head_count[i] for i in range(geometry.n_layers)],
        head_count_kv=[0 if i in removed else geometry.head_count_kv[i] for i in range(geometry.n_layers)],
    )


def rope_reorders(model: GGUFLayout, geometry: ModelGeometry, removed: list[int]) -> dict[str, int]:
    """Heads per kept Q/K tensor whose rows must be reordered for deci's normal RoPE (NEOX-layout files)."""
    if prunable_architecture(geometry.architecture).rope_style != "neox":
        return {}
    if geometry.n_rot != geometry.head_dim:
        raise GatenormError(f"{model.path}: partial RoPE ({geometry.n_rot} of {geometry.head_dim} dimensions) has no deci form")
    reorders = {}
    for layer in range(geometry.n_layers):
        if layer in removed:
            continue
        for suffix in ROPE_PERMUTED_TENSORS:
            name = f"blk.{layer}.{suffix}"
            if name in model.tensors:
                reorders[name] = _rope_heads(
                    suffix, model.tensors[name], geometry.head_count[layer], geometry.head_count_kv[layer], geometry.head_dim
                )
    return reorders


def _output_tensors(
    model: GGUFLayout, choice: _LayerChoice, reorders: dict[str, int], n_embd: int
) -> tuple[list[TensorCopy], list[TensorSpan]]:
    """The output's tensors in the source's order (a linear layer's attn_output replaced), and the dropped ones."""
    kept: list[TensorCopy] = []
    dropped: list[TensorSpan] = []
    for info in model.tensors.values():
        block = block_tensor(info.name)
        if block is None or block[1] not in ATTENTION_TENSORS or block[0] not in choice.removed:
            kept.append(TensorCopy(info.name, info, rope_heads=reorders.get(info.name)))
        elif block[0] in choice.linear and block[1] == "attn_output.weight":
            kept.append(TensorCopy(info.name, _linear_output_span(model, block[0], n_embd), computed_layer=block[0]))
            dropped.append(info)
        elif block[0] in choice.linear and block[1] in LINEAR_KEPT_TENSORS:
            kept.append(TensorCopy(info.name, info))
        else:
            dropped.append(info)
    if not kept:
        raise GatenormError(f"{model.path}: no tensors to write")
    return kept, dropped


def _plan(model: GGUFLayout, layers: Sequence[int], provenance: dict[str, str] | None, linear: Collection[int]) -> RewritePlan:
    src = model.path
    check_single_file(model)
    architecture = prunable_architecture(model.architecture).name
    geometry = ModelGeometry.from_gguf(model)
    check_tensor_names(model, geometry.n_layers)
    choice = _choose_layers(geometry, layers, linear, src)
    kept, dropped = _output_tensors(model, choice, rope_reorders(model, geometry, choice.removed), geometry.n_embd)
    provenance = with_tool(provenance, architecture, TARGET_ARCH)
    counts = {Keys.Attention.HEAD_COUNT.format(arch=TARGET_ARCH): choice.head_count,
              Keys.Attention.HEAD_COUNT_KV.format(arch=TARGET_ARCH): choice.head_count_kv}
    added = {PRUNED_LAYERS_KEY: kv_uint32_array(PRUNED_LAYERS_KEY, choice.attention_free)}
    if choice.linear:
        added[LINEAR_LAYERS_KEY] = kv_uint32_array(LINEAR_LAYERS_KEY, choice.linear)
    kv, sha_offset = header_fields(
        model, architecture, TARGET_ARCH, {key: kv_uint32_array(key, values) for key, values in counts.items()},
        added, Path(src), provenance,
    )
    header, sha256_offset = assemble_header(kept, kv, sha_offset, model.alignment)
    return RewritePlan(
        architecture=architecture,
        n_layers=geometry.n_layers,
        attention_free=choice.attention_free,
        linear=choice.linear,
        requested=sorted(int(layer) for layer in layers),
        header=header,
        sha256_offset=sha256_offset,
        alignment=model.alignment,
        tensors=kept,
        dropped=dropped,
    )
