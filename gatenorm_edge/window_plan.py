"""Plan a GGUF rewrite into llama.cpp's ``granite_swa`` architecture, where chosen layers attend only to the
last W tokens: every decision before a byte is written (``rewrite`` streams the plan).

``granite_swa`` is a plain pre-norm llama block (optional Q/K/V biases, normal RoPE) with a per-layer
sliding-window pattern and one attention-sink logit per head and layer (``blk.N.attn_sinks.weight``, F32):
a windowed query at position p sees the keys at p - W + 1 .. p, and its softmax denominator gains
exp(sink), so the sink soaks up the weight full attention gave to what the window no longer holds. A llama
file becomes one by renaming its ``llama.*`` keys and adding the window keys, ``logit_scale`` 1.0 and a sink
tensor per layer (NO_SINK, which adds nothing, for layers that keep full attention); qwen2 Q/K rows are
reordered for normal RoPE exactly as for ``deci``. No weight changes, no tensor is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gguf import GGMLQuantizationType, Keys

from .errors import GatenormError
from .gguf_layout import GGUFLayout, TensorSpan
from .rewrite_plan import (
    RewritePlan, TensorCopy, assemble_header, block_tensor, check_layer_list, check_single_file, check_tensor_names, header_fields,
    kv_float32, kv_uint32, kv_uint32_array, rope_reorders, with_tool,
)
from .sources.architectures import prunable_architecture
from .sources.geometry import ModelGeometry

WINDOW_ARCH = "granite_swa"
WINDOWED_LAYERS_KEY = "gatenorm.windowed_layers"
SINKS = "attn_sinks.weight"
NO_SINK = -1.0e4  # exp(NO_SINK - max logit) is 0 in float32: the softmax is unchanged
WINDOWABLE = ("llama", "qwen2")


def check_window_source(model: GGUFLayout, geometry: ModelGeometry) -> str:
    """The source's architecture, when granite_swa can hold it; else one line saying why not."""
    name = model.architecture
    if name == WINDOW_ARCH:
        raise GatenormError(f"{model.path}: already a {WINDOW_ARCH} file; window the original model")
    if geometry.attention_free or geometry.linear_attention:
        raise GatenormError(
            f"{model.path}: has attention-free or linear-attention layers; windows need every layer's attention, "
            "so window the original model"
        )
    if name not in WINDOWABLE:
        raise GatenormError(
            f"cannot window architecture '{name}': only {' and '.join(WINDOWABLE)} files map onto llama.cpp's "
            f"{WINDOW_ARCH} graph (a plain llama block with optional Q/K/V biases)"
        )
    return prunable_architecture(name).name


def check_window(window: int, geometry: ModelGeometry, where: str) -> None:
    """A window must be at least 1 token and shorter than the training context (else it windows nothing)."""
    if window < 1:
        raise GatenormError(f"--window must be at least 1 token, not {window}")
    trained = geometry.context_length
    if trained is not None and window >= trained:
        raise GatenormError(
            f"--window {window} is not below {Path(where).name}'s training context of {trained} tokens: "
            "such a window never cuts anything off"
        )


def check_windowed_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    chosen = check_layer_list(layers, n_layers)
    if not chosen:
        raise GatenormError("no layers to window")
    return sorted(chosen)


def plan_window(src: Path, layers: Sequence[int], window: int, provenance: dict[str, str] | None = None) -> RewritePlan:
    """Validate the request and lay out ``src`` as granite_swa with ``layers`` windowed to ``window`` tokens."""
    with GGUFLayout(src) as model:
        check_single_file(model)
        geometry = ModelGeometry.from_gguf(model)
        architecture = check_window_source(model, geometry)
        check_window(window, geometry, str(src))
        windowed = check_windowed_layers(layers, geometry.n_layers)
        check_tensor_names(model, geometry.n_layers, WINDOW_ARCH)
        reorders = rope_reorders(model, geometry, [])
        tensors: list[TensorCopy] = []
        for info in model.tensors.values():
            tensors.append(TensorCopy(info.name, info, rope_heads=reorders.get(info.name)))
            block = block_tensor(info.name)
            if block is not None and block[1] == "attn_output.weight":
                layer, n_head = block[0], geometry.head_count[block[0]]
                sinks = TensorSpan(f"blk.{layer}.{SINKS}", (n_head,), GGMLQuantizationType.F32, -1, 4 * n_head)
                tensors.append(TensorCopy(sinks.name, sinks, computed_layer=layer))
        if sum(copy.computed_layer is not None for copy in tensors) != geometry.n_layers:
            raise GatenormError(f"{src}: every layer needs an attn_output tensor to be windowed")
        swa, pattern, scale = (key.format(arch=WINDOW_ARCH) for key in (
            Keys.Attention.SLIDING_WINDOW, Keys.Attention.SLIDING_WINDOW_PATTERN, Keys.LLM.LOGIT_SCALE))
        replaced = {
            swa: kv_uint32(swa, window),
            pattern: kv_uint32_array(pattern, [int(i in windowed) for i in range(geometry.n_layers)]),
            scale: kv_float32(scale, 1.0),
        }
        kv, sha_offset = header_fields(
            model, architecture, WINDOW_ARCH, replaced, {WINDOWED_LAYERS_KEY: kv_uint32_array(WINDOWED_LAYERS_KEY, windowed)}, Path(src),
            with_tool(provenance, architecture, WINDOW_ARCH) | {"window": str(window)},
        )
        header, sha256_offset = assemble_header(tensors, kv, sha_offset, model.alignment)
        return RewritePlan(
            architecture=architecture, n_layers=geometry.n_layers, attention_free=[], linear=[], requested=windowed,
            header=header, sha256_offset=sha256_offset, alignment=model.alignment, tensors=tensors,
            target=WINDOW_ARCH, windowed=windowed, window=window,
        )
