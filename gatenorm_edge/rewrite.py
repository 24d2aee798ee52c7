"""Rewrite a GGUF so chosen layers run attention-free in stock llama.cpp (the ``deci`` architecture).

llama.cpp's ``deci`` graph skips a layer's attention sublayer when the per-layer array
``deci.attention.head_count`` holds 0 there, and then that layer must carry no attention tensors.
``llama`` files become ``deci`` files by renaming their ``llama.*`` keys; ``qwen2`` files also need
their Q/K rows reordered within each head, because ``deci`` applies normal (GPT-J style) RoPE to
adjacent pairs while qwen2 files are laid out for NEOX RoPE, which pairs dimension i with i + d/2.

The rewrite streams: metadata is copied field by field as raw bytes (only renamed or new keys are
encoded), tensor bytes go from file to file in the kernel (``copy_file_range``) or through a bounded
buffer, and only the reordered Q/K tensors pass through memory, one at a time.

Layers can instead become ``deci`` "linear attention" (``head_count > 0``, ``head_count_kv == 0``):
llama.cpp then computes ``x + attn_output @ attn_norm(x)`` there, with no KV cache. Such a layer keeps
its ``attn_norm``; its new n_embd x n_embd ``attn_output`` comes from a caller's function, one layer
at a time while writing, in the source's ``attn_output`` type where ``gguf.quants`` can quantize to it
(F16 otherwise). Stock llama.cpp applies no bias on that path, so none is written.
"""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_VERSION, GGMLQuantizationType, GGUFValueType, Keys
from gguf.quants import QuantError, quantize

from . import __version__
from .errors import GatenormError
from .fileio import BackgroundSha256, atomic_output
from .gguf_layout import GGUF_MAGIC, GGUFLayout, TensorSpan, head_counts
from .sources.architectures import refuse_mixture_of_experts
from .sources.rope_layout import hf_to_gguf_rows

TARGET_ARCH = "deci"
PROVENANCE_PREFIX = "gatenorm."
PRUNED_LAYERS_KEY = "gatenorm.pruned_layers"
LINEAR_LAYERS_KEY = "gatenorm.linear_layers"
SOURCE_NAME_KEY = "gatenorm.source.name"
SOURCE_SHA256_KEY = "gatenorm.source.sha256"
SHA256_PLACEHOLDER = "0" * 64
COPY_CHUNK = 64 << 20
HEADER_PAGE_SLACK = 1 << 20

# Architectures prune can express as ``deci``, and how their attention tensors are laid out.
NEOX_ROPE_ARCHS = frozenset({"qwen2"})
PRUNABLE_ARCHS = frozenset({"llama", "deci"}) | NEOX_ROPE_ARCHS

# Why the others cannot be expressed in stock llama.cpp's ``deci`` graph (read from its source).
UNSUPPORTED_REASONS: dict[str, str] = {
    "gemma": "scales embeddings by sqrt(n_embd) and uses a GELU feed-forward; deci has neither",
    "gemma2": "sandwich norms (post-attention and post-FFN RMSNorm) and logit soft-capping have no deci form",
    "gemma3": "sandwich norms (post-attention and post-FFN RMSNorm) and q/k norms have no attention-free "
    "form in stock llama.cpp's deci architecture",
    "gemma3n": "sandwich norms, q/k norms and per-layer embeddings have no deci form",
    "qwen3": "q/k RMSNorm inside attention (attn_q_norm/attn_k_norm) has no deci form",
    "qwen3moe": "q/k RMSNorm inside attention and a mixture-of-experts FFN have no deci form",
    "qwen2moe": "a mixture-of-experts FFN with shared experts has no deci form",
    "olmo2": "post-sublayer norms and q/k norms have no deci form",
    "phi3": "a fused gate/up feed-forward (one ffn_up tensor holding both halves) has no deci form",
    "phi2": "LayerNorm with biases, parallel attention/FFN and GELU have no deci form",
    "granite": "logit, residual, embedding and attention scales have no deci keys",
    "starcoder2": "LayerNorm with biases and a GELU feed-forward have no deci form",
    "gpt2": "LayerNorm with biases, learned positions and GELU have no deci form",
    "mistral3": "attention temperature scaling has no deci form",
    "cohere2": "parallel attention/FFN blocks and sliding-window layers have no deci form",
}

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
class PruneResult:
    """What a rewrite did: attention-free layers of the output, sizes, and what was dropped."""

    source: str
    output: str
    architecture: str
    n_layers: int
    layers_pruned: list[int]
    layers_requested: list[int]
    bytes_in: int
    bytes_out: int
    dropped_bytes: int
    dropped_tensors: list[str]
    permuted_tensors: list[str]
    seconds: float
    source_sha256: str = ""
    linear_layers: list[int] = field(default_factory=list)
    linear_tensor_type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _TensorCopy:
    """One output tensor: where its bytes come from, for RoPE reordering its number of heads, and for a
    computed linear-attention matrix its layer (``info`` then describes the new tensor, not a source)."""

    name: str
    info: TensorSpan
    out_offset: int = 0
    rope_heads: int | None = None
    linear_layer: int | None = None


@dataclass
class _Plan:
    """Everything needed to write the output, decided before a byte is written."""

    architecture: str
    n_layers: int
    attention_free: list[int]
    linear: list[int]
    requested: list[int]
    header: bytes
    sha256_offset: int
    alignment: int
    tensors: list[_TensorCopy]
    dropped: list[TensorSpan] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        last = self.tensors[-1]
        return last.out_offset + last.info.n_bytes

    @property
    def output_bytes(self) -> int:
        return _align(len(self.header), self.alignment) + self.data_bytes


# --------------------------------------------------------------------------------------------
# GGUF encoding of the few metadata values we create (everything else is copied as raw bytes)


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


def _encode_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv_string(key: str, value: str) -> bytes:
    return _encode_str(key) + struct.pack("<I", GGUFValueType.STRING) + _encode_str(value)


def _kv_uint32_array(key: str, values: Sequence[int]) -> bytes:
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
# Reading what the input says about its layers


def _block_count(model: GGUFLayout) -> int:
    n_layers = model.arch_value("block_count")
    if n_layers is None:
        raise GatenormError(f"{model.path}: metadata key {model.architecture}.block_count is missing")
    return int(n_layers)


def _check_single_file(model: GGUFLayout) -> None:
    splits = int(model.value(Keys.Split.LLM_KV_SPLIT_COUNT, 1))
    if splits > 1:
        raise GatenormError(f"{model.path}: split GGUF ({splits} files); merge it first with llama-gguf-split --merge")


def check_architecture(architecture: str) -> None:
    """Raise GatenormError naming the architecture and why, unless prune can express it."""
    if architecture in PRUNABLE_ARCHS:
        return
    reason = UNSUPPORTED_REASONS.get(
        architecture,
        f"only {', '.join(sorted(PRUNABLE_ARCHS))} files have been verified to map onto llama.cpp's deci graph",
    )
    raise GatenormError(f"cannot prune architecture '{architecture}': {reason}")


def _block_tensor(name: str) -> tuple[int, str] | None:
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None


def _check_tensor_names(model: GGUFLayout, n_layers: int) -> None:
    allowed = set(ATTENTION_TENSORS) | set(FFN_TENSORS)
    for info in model.tensors.values():
        block = _block_tensor(info.name)
        ok = info.name in GLOBAL_TENSORS if block is None else (block[0] < n_layers and block[1] in allowed)
        if not ok:
            raise GatenormError(
                f"{model.path}: tensor {info.name} has no place in llama.cpp's deci architecture; cannot prune this file"
            )


def _validate_layers(layers: Sequence[int], n_layers: int, already_free: list[int]) -> list[int]:
    requested = [int(layer) for layer in layers]
    duplicates = sorted(layer for layer, count in Counter(requested).items() if count > 1)
    if duplicates:
        raise GatenormError(f"layer(s) listed more than once: {', '.join(map(str, duplicates))}")
    out_of_range = sorted(layer for layer in requested if not 0 <= layer < n_layers)
    if out_of_range:
        raise GatenormError(
            f"layer(s) out of range: {', '.join(map(str, out_of_range))} (the model has layers 0..{n_layers - 1})"
        )
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
# RoPE layout: qwen2 rows are laid out for NEOX RoPE (pairs i, i + d/2), deci rotates adjacent
# pairs (2i, 2i + 1). Reordering each head's rows with the llama converter's permutation
# (sources.rope_layout.hf_to_gguf_rows) on both Q and K leaves every q.k unchanged; each row is
# quantized on its own, so the reordering moves whole rows of bytes.


def _row_geometry(info: TensorSpan) -> tuple[int, int]:
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
    n_rows, _ = _row_geometry(info)
    heads = n_head if name.startswith("attn_q") else n_head_kv
    if n_rows != heads * head_dim or head_dim % 2:
        raise GatenormError(f"{info.name}: {n_rows} rows, expected {heads} heads x an even head size {head_dim}")
    return heads


# --------------------------------------------------------------------------------------------
# Planning


def _header_fields(
    model: GGUFLayout,
    architecture: str,
    head_count: list[int],
    head_count_kv: list[int],
    attention_free: list[int],
    linear: list[int],
    source: Path,
    provenance: dict[str, str],
) -> tuple[list[bytes], int]:
    """Encoded KV pairs of the output, and where in them the source sha256 placeholder sits."""
    arch_prefix = f"{architecture}."
    count_keys = {
        Keys.Attention.HEAD_COUNT.format(arch=TARGET_ARCH): head_count,
        Keys.Attention.HEAD_COUNT_KV.format(arch=TARGET_ARCH): head_count_kv,
    }
    rewritten = {PRUNED_LAYERS_KEY, LINEAR_LAYERS_KEY, SOURCE_NAME_KEY, SOURCE_SHA256_KEY}
    rewritten |= {PROVENANCE_PREFIX + k for k in provenance}
    out: list[bytes] = []
    for key, span in model.fields.items():
        if key in rewritten:
            continue
        if key == Keys.General.ARCHITECTURE:
            out.append(_kv_string(key, TARGET_ARCH))
        elif key.startswith(arch_prefix):
            new_key = TARGET_ARCH + "." + key[len(arch_prefix):]
            if new_key in count_keys:
                out.append(_kv_uint32_array(new_key, count_keys.pop(new_key)))
            else:
                out.append(_encode_str(new_key) + model.raw(span.value_start - 4, span.end))
        else:
            out.append(model.raw(span.start, span.end))
    out.extend(_kv_uint32_array(key, values) for key, values in count_keys.items())
    out.append(_kv_uint32_array(PRUNED_LAYERS_KEY, attention_free))
    if linear:
        out.append(_kv_uint32_array(LINEAR_LAYERS_KEY, linear))
    for key, value in sorted(provenance.items()):
        out.append(_kv_string(PROVENANCE_PREFIX + key, str(value)))
    out.append(_kv_string(SOURCE_NAME_KEY, source.name))
    sha_field = _kv_string(SOURCE_SHA256_KEY, SHA256_PLACEHOLDER)
    sha_offset = sum(len(chunk) for chunk in out) + len(sha_field) - len(SHA256_PLACEHOLDER)
    out.append(sha_field)
    return out, sha_offset


def plan_rewrite(
    src: Path, layers: Sequence[int], provenance: dict[str, str] | None = None, *, linear: Collection[int] = ()
) -> _Plan:
    """Validate the request against the file and lay out the output, without writing anything.

    The ``linear`` ones of ``layers`` become deci linear-attention layers; the others attention-free.
    """
    with GGUFLayout(src) as model:
        return _plan(model, layers, provenance, linear)


def linear_tensor_type(source_type: GGMLQuantizationType, n_embd: int) -> GGMLQuantizationType:
    """The type a new n_embd x n_embd attn_output is written in: the source's if gguf.quants can make it, else F16."""
    try:
        quantize(np.zeros((1, n_embd), dtype=np.float32), source_type)
    except (NotImplementedError, QuantError):
        return GGMLQuantizationType.F16
    return source_type


def _linear_output_span(model: GGUFLayout, layer: int) -> TensorSpan:
    """Shape, type and size of layer ``layer``'s new linear-attention attn_output (not yet computed)."""
    n_embd = int(model.arch_value("embedding_length"))
    name = f"blk.{layer}.attn_output.weight"
    if name not in model.tensors:
        raise GatenormError(f"{model.path}: {name} is missing; cannot make layer {layer} linear attention")
    tensor_type = linear_tensor_type(model.tensors[name].tensor_type, n_embd)
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    return TensorSpan(name, (n_embd, n_embd), tensor_type, -1, n_embd * n_embd // block_size * type_size)


def _plan(model: GGUFLayout, layers: Sequence[int], provenance: dict[str, str] | None, linear: Collection[int]) -> _Plan:
    src = model.path
    _check_single_file(model)
    architecture = model.architecture
    check_architecture(architecture)
    n_layers = _block_count(model)
    refuse_mixture_of_experts(model.arch_value("expert_count", 0), str(src))
    _check_tensor_names(model, n_layers)

    head_count, head_count_kv = head_counts(model, n_layers)
    already_free = [i for i in range(n_layers) if head_count[i] == 0]
    already_linear = [i for i in range(n_layers) if head_count[i] > 0 and head_count_kv[i] == 0]
    if already_linear:
        raise GatenormError(
            f"{src}: layer(s) {', '.join(map(str, already_linear))} use deci linear attention; cannot prune this file"
        )
    removed = _validate_layers(layers, n_layers, already_free)
    if not set(linear) <= set(layers):
        raise GatenormError("linear-attention layers must be among the layers removed")
    linear_layers = sorted(int(layer) for layer in linear)
    no_attention = sorted(set(linear_layers) & set(already_free))
    if no_attention:
        raise GatenormError(
            f"layer(s) {', '.join(map(str, no_attention))} are already attention-free: no attention to make linear"
        )
    attention_free = [i for i in removed if i not in linear_layers]
    new_head_count = [0 if i in attention_free else head_count[i] for i in range(n_layers)]
    new_head_count_kv = [0 if i in removed else head_count_kv[i] for i in range(n_layers)]

    rope_heads: dict[str, int] = {}
    if architecture in NEOX_ROPE_ARCHS:
        n_embd = int(model.arch_value("embedding_length"))
        head_dim = int(model.arch_value("attention.key_length", n_embd // head_count[0]))
        n_rot = int(model.arch_value("rope.dimension_count", head_dim))
        if n_rot != head_dim:
            raise GatenormError(f"{src}: partial RoPE ({n_rot} of {head_dim} dimensions) has no deci form")
        for layer in range(n_layers):
            if layer in removed:
                continue
            for suffix in ROPE_PERMUTED_TENSORS:
                name = f"blk.{layer}.{suffix}"
                if name in model.tensors:
                    rope_heads[name] = _rope_heads(
                        suffix, model.tensors[name], head_count[layer], head_count_kv[layer], head_dim
                    )

    kept: list[_TensorCopy] = []
    dropped: list[TensorSpan] = []
    for info in model.tensors.values():
        block = _block_tensor(info.name)
        if block is None or block[1] not in ATTENTION_TENSORS or block[0] not in removed:
            kept.append(_TensorCopy(info.name, info, rope_heads=rope_heads.get(info.name)))
        elif block[0] in linear_layers and block[1] == "attn_output.weight":
            kept.append(_TensorCopy(info.name, _linear_output_span(model, block[0]), linear_layer=block[0]))
            dropped.append(info)
        elif block[0] in linear_layers and block[1] in LINEAR_KEPT_TENSORS:
            kept.append(_TensorCopy(info.name, info))
        else:
            dropped.append(info)
    if not kept:
        raise GatenormError(f"{src}: no tensors to write")

    alignment = model.alignment
    offset = 0
    infos = []
    for copy in kept:
        copy.out_offset = offset
        infos.append(_tensor_info(copy.name, [int(d) for d in copy.info.shape], int(copy.info.tensor_type), offset))
        offset = _align(offset + copy.info.n_bytes, alignment)

    provenance = dict(provenance or {})
    provenance.setdefault("tool", f"gatenorm-edge {__version__}")
    if architecture != TARGET_ARCH:
        provenance.setdefault("source.architecture", architecture)
    kv, sha_offset = _header_fields(
        model, architecture, new_head_count, new_head_count_kv, attention_free, linear_layers, Path(src), provenance
    )
    prefix = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(kept), len(kv))
    header = prefix + b"".join(kv) + b"".join(infos)
    return _Plan(
        architecture=architecture,
        n_layers=n_layers,
        attention_free=attention_free,
        linear=linear_layers,
        requested=sorted(int(layer) for layer in layers),
        header=header,
        sha256_offset=len(prefix) + sha_offset,
        alignment=alignment,
        tensors=kept,
        dropped=dropped,
    )


# --------------------------------------------------------------------------------------------
# Writing


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int, advance: Callable[[int], None]) -> None:
    """Copy ``count`` bytes from ``src_fd`` at ``offset`` to the current position of ``dst_fd``."""
    while count > 0:
        step = min(count, COPY_CHUNK)
        try:
            copied = os.copy_file_range(src_fd, dst_fd, step, offset)
        except OSError:
            copied = 0
        if copied <= 0:
            block = os.pread(src_fd, step, offset)
            if not block:
                raise GatenormError("input file ended early while copying tensor data")
            _write_all(dst_fd, block)
            copied = len(block)
        offset += copied
        count -= copied
        advance(copied)


def _write_reordered(src_fd: int, dst_fd: int, copy: _TensorCopy) -> None:
    n_rows, row_bytes = _row_geometry(copy.info)
    raw = os.pread(src_fd, copy.info.n_bytes, copy.info.data_offset)
    if len(raw) != n_rows * row_bytes:
        raise GatenormError(f"input file ended early while reading {copy.name}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(n_rows, row_bytes)
    _write_all(dst_fd, hf_to_gguf_rows(rows, copy.rope_heads).tobytes())


def _write_linear(dst_fd: int, copy: _TensorCopy, linear_maps: LinearMaps) -> None:
    """Compute, quantize and write one layer's linear-attention matrix (n_embd x n_embd, rows = outputs)."""
    n_embd = copy.info.shape[0]
    matrix = np.asarray(linear_maps(copy.linear_layer), dtype=np.float32)
    if matrix.shape != (n_embd, n_embd) or not np.isfinite(matrix).all():
        raise GatenormError(f"layer {copy.linear_layer}: linear attention must be a finite {n_embd}x{n_embd} matrix")
    data = quantize(matrix, copy.info.tensor_type).tobytes()
    if len(data) != copy.info.n_bytes:
        raise GatenormError(f"{copy.name}: quantized to {len(data)} bytes, expected {copy.info.n_bytes}")
    _write_all(dst_fd, data)


def check_output_path(src: Path, dst: Path, force: bool) -> None:
    """Refuse an output that is the input, a directory, an existing file without ``force``, or in no folder."""
    if (dst.exists() and os.path.samefile(src, dst)) or dst.resolve() == src.resolve():
        raise GatenormError(f"output {dst} is the input file; choose another output path")
    if dst.is_dir():
        raise GatenormError(f"output {dst} is a directory")
    if dst.exists() and not force:
        raise GatenormError(f"{dst} exists; pass --force to overwrite it")
    if not dst.parent.is_dir():
        raise GatenormError(f"output folder {dst.parent} does not exist")


def _check_free_space(dst: Path, needed: int) -> None:
    free = shutil.disk_usage(dst.parent).free
    if free < needed + HEADER_PAGE_SLACK:
        raise GatenormError(
            f"not enough free disk space in {dst.parent}: the output needs {needed / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB are free"
        )


def prune_gguf(
    src: Path,
    dst: Path,
    layers: Sequence[int],
    *,
    force: bool = False,
    provenance: dict[str, str] | None = None,
    progress: bool = False,
    linear_maps: LinearMaps | None = None,
    linear: Collection[int] | None = None,
) -> PruneResult:
    """Write ``dst``: ``src`` as a ``deci`` GGUF whose ``layers`` (plus any already so) are attention-free.

    ``provenance`` entries are stored as ``gatenorm.<key>`` strings (e.g. ``{"variant": "per-head"}``).
    With ``linear_maps`` the ``linear`` ones of ``layers`` (default: all) become linear attention instead:
    ``linear_maps(layer)`` gives the n_embd x n_embd matrix (float, rows = outputs) written as that layer's
    ``attn_output``.
    """
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise GatenormError(f"{src}: no such file")
    check_output_path(src, dst, force)
    if linear_maps is None:
        linear = ()
    with BackgroundSha256(src) as sha256:  # hashed while the header is planned and the data copied
        plan = plan_rewrite(src, layers, provenance, linear=layers if linear is None else linear)
        _check_free_space(dst, plan.output_bytes)
        _write(src, dst, plan, sha256, force, progress, linear_maps)
    return PruneResult(
        source=str(src),
        output=str(dst),
        architecture=plan.architecture,
        n_layers=plan.n_layers,
        layers_pruned=plan.attention_free,
        layers_requested=plan.requested,
        bytes_in=src.stat().st_size,
        bytes_out=dst.stat().st_size,
        dropped_bytes=sum(info.n_bytes for info in plan.dropped),
        dropped_tensors=[info.name for info in plan.dropped],
        permuted_tensors=[copy.name for copy in plan.tensors if copy.rope_heads is not None],
        seconds=time.perf_counter() - started,
        source_sha256=sha256.result(),
        linear_layers=plan.linear,
        linear_tensor_type=next((c.info.tensor_type.name for c in plan.tensors if c.linear_layer is not None), None),
    )


def _write(
    src: Path, dst: Path, plan: _Plan, sha256: BackgroundSha256, force: bool, progress: bool,
    linear_maps: LinearMaps | None,
) -> None:
    """Stream ``plan`` into ``dst`` atomically: header, copied or rewritten tensors, then the source hash."""
    bar = _progress_bar(progress, plan.output_bytes, f"writing {dst.name}")
    with bar as advance, atomic_output(dst, force=force) as handle, open(src, "rb", buffering=0) as source:
        out_fd, src_fd = handle.fileno(), source.fileno()
        data_start = _align(len(plan.header), plan.alignment)
        _write_all(out_fd, plan.header + bytes(data_start - len(plan.header)))
        advance(data_start)
        for copy in plan.tensors:
            padding = data_start + copy.out_offset - os.lseek(out_fd, 0, os.SEEK_CUR)
            _write_all(out_fd, bytes(padding))
            if copy.linear_layer is not None:
                _write_linear(out_fd, copy, linear_maps)
                advance(copy.info.n_bytes)
            elif copy.rope_heads is None:
                _copy_range(src_fd, out_fd, copy.info.data_offset, copy.info.n_bytes, advance)
            else:
                _write_reordered(src_fd, out_fd, copy)
                advance(copy.info.n_bytes)
            advance(padding)
        os.fdatasync(out_fd)  # the data reaches the disk while the hash finishes; the final fsync is then small
        os.pwrite(out_fd, sha256.result().encode("ascii"), plan.sha256_offset)


class _NoProgress:
    def __enter__(self) -> Callable[[int], None]:
        return lambda _n: None

    def __exit__(self, *exc: object) -> None:
        return None


class _BytesProgress:
    """A rich progress bar over bytes written, on stderr."""

    def __init__(self, total: int, description: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=Console(stderr=True), transient=True,
        )
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> Callable[[int], None]:
        self._progress.start()
        return lambda n: self._progress.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()


def _progress_bar(enabled: bool, total: int, description: str) -> _NoProgress | _BytesProgress:
    return _BytesProgress(total, description) if enabled else _NoProgress()


# --------------------------------------------------------------------------------------------
# Inspection


def _attention_free(model: GGUFLayout) -> list[int]:
    value = model.arch_value("attention.head_count")
    if not isinstance(value, list):
        return []
    return [i for i, count in enumerate(value) if int(count) == 0]


KV_BYTES_PER_VALUE = 2  # llama.cpp's default F16 K and V cache


def _attention_cost(model: GGUFLayout) -> dict[str, Any]:
    """Per-token cost of the attention sublayers as the file stands, by layer kind.

    ``flops``: 2 per weight of the Q/K/V/O (or linear) matrices; ``flops_per_context_token``: the
    softmax attention's QK and AV products, 4 x heads x head size per cached token; ``weight_bytes``:
    attention tensor bytes read per token; ``kv_bytes``: K and V cache bytes added per token (F16).
    """
    n_layers = int(model.arch_value("block_count", 0) or 0)
    if n_layers == 0 or model.arch_value("attention.head_count") is None:
        return {}
    heads, kv_heads = head_counts(model, n_layers)
    n_embd = int(model.arch_value("embedding_length"))
    head_dim = int(model.arch_value("attention.key_length", n_embd // max(heads[0], 1)))
    kinds: dict[str, list[int]] = {"attention": [], "linear": [], "free": []}
    cost = {"flops": 0, "flops_per_context_token": 0, "weight_bytes": 0, "kv_bytes": 0}
    for layer in range(n_layers):
        kind = "free" if heads[layer] == 0 else "linear" if kv_heads[layer] == 0 else "attention"
        kinds[kind].append(layer)
        for suffix in ATTENTION_TENSORS:
            info = model.tensors.get(f"blk.{layer}.{suffix}")
            if info is None:
                continue
            cost["weight_bytes"] += info.n_bytes
            if len(info.shape) == 2:
                cost["flops"] += 2 * int(info.shape[0]) * int(info.shape[1])
        if kind == "attention":
            cost["flops_per_context_token"] += 4 * heads[layer] * head_dim
            cost["kv_bytes"] += 2 * kv_heads[layer] * head_dim * KV_BYTES_PER_VALUE
    return {"layers": kinds, "per_token": cost}


def attention_cost(path: Path | str) -> dict[str, Any]:
    """Per-token FLOPs, weight bytes and KV bytes of a file's attention sublayers (see ``inspect_gguf``)."""
    with GGUFLayout(path) as model:
        return _attention_cost(model)


def attention_free_layers(path: Path | str) -> list[int]:
    """Layers whose per-layer ``head_count`` is 0 (only files with per-layer arrays have any)."""
    with GGUFLayout(path) as model:
        return _attention_free(model)


def inspect_gguf(path: Path | str) -> dict[str, Any]:
    """Architecture, layers, attention-free layers, size, tensor types, gatenorm provenance, attention cost."""
    with GGUFLayout(path) as model:
        n_layers = int(model.arch_value("block_count", 0) or 0)
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
        free = _attention_free(model)
        return {
            "file": str(path),
            "architecture": model.architecture,
            "name": model.value("general.name"),
            "n_layers": n_layers,
            "attention_free_layers": free,
            "attention_layers": n_layers - len(free),
            "size_bytes": model.size,
            "n_tensors": sum(types.values()),
            "tensor_types": {name: {"count": types[name], "bytes": type_bytes[name]} for name in sorted(types)},
            "gatenorm": provenance,
            "attention_cost": _attention_cost(model),
        }
