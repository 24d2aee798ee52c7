"""The one architecture table: what can be scored or pruned (and why not), the RoPE layout of the
GGUF Q/K rows, and where attention tensors live in GGUF and HF naming.

Tensor names and the HF -> GGUF name map come from the ``gguf`` package (``TENSOR_NAMES``,
``TensorNameMap``); this table only adds what it lacks: which HF ``model_type`` values belong to
which GGUF architecture, the Q/K row layout of the GGUF files, and gemma's ``1 + w`` norm storage.
llama (and mistral, which llama.cpp converts to the llama architecture) and qwen2 can be rewritten
to attention-free layers; qwen3 and gemma3 are for scoring only; deci (what ``prune`` writes) can be
pruned again but not scored; granite_swa (what ``prune --mode window`` writes) is neither. Why the others cannot be pruned was read from llama.cpp's source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, TensorNameMap

from ..errors import GatenormError


class AttentionNames(NamedTuple):
    """GGUF names of one layer's query weight, key weight and attention RMSNorm gain."""

    q: str
    k: str
    norm: str


@dataclass(frozen=True)
class Architecture:
    """One supported model family."""

    model_arch: MODEL_ARCH | str
    """gguf's enum member, or the architecture's GGUF name where the installed gguf has no member for it."""
    hf_model_types: tuple[str, ...]
    gguf_qk_interleaved: bool
    """True when GGUF Q/K rows are in llama.cpp's interleaved RoPE order (see ``rope_layout``)."""
    hf_norm_offset: float
    """Added to an HF RMSNorm weight to get the gain it multiplies by (gemma stores ``gain - 1``)."""
    prune_refusal: str | None = None
    """Why ``prune`` cannot express this architecture as ``deci``; None when it can."""
    scorable: bool = True
    llama_block: bool = True
    """A plain pre-norm llama block (optional Q/K/V/O biases): what the reference forward pass computes."""

    @property
    def rope_style(self) -> str:
        """``normal`` (llama.cpp's interleaved pairs, what deci uses) or ``neox`` (split halves)."""
        return "normal" if self.gguf_qk_interleaved else "neox"

    @property
    def name(self) -> str:
        """The GGUF ``general.architecture`` value."""
        return self.model_arch if isinstance(self.model_arch, str) else MODEL_ARCH_NAMES[self.model_arch]

    def attention_names(self, layer: int) -> AttentionNames:
        """GGUF tensor names of layer ``layer``'s Q, K and attention-norm weights."""

        def name(tensor: MODEL_TENSOR) -> str:
            return TENSOR_NAMES[tensor].format(bid=layer) + ".weight"

        return AttentionNames(name(MODEL_TENSOR.ATTN_Q), name(MODEL_TENSOR.ATTN_K), name(MODEL_TENSOR.ATTN_NORM))

    def hf_to_gguf_names(self, hf_names: list[str], n_layers: int) -> dict[str, str]:
        """Map the GGUF name of every recognised HF tensor to its HF name (unrecognised ones are left out)."""
        name_map = TensorNameMap(self.model_arch, n_layers)
        mapped = {}
        for hf_name in hf_names:
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is not None:
                mapped[gguf_name] = hf_name
        return mapped


ARCHITECTURES = (
    Architecture(MODEL_ARCH.LLAMA, ("llama", "mistral"), gguf_qk_interleaved=True, hf_norm_offset=0.0),
    Architecture(MODEL_ARCH.QWEN2, ("qwen2",), gguf_qk_interleaved=False, hf_norm_offset=0.0),
    Architecture(
        MODEL_ARCH.QWEN3, ("qwen3",), gguf_qk_interleaved=False, hf_norm_offset=0.0,
        prune_refusal="q/k RMSNorm inside attention (attn_q_norm/attn_k_norm) has no deci form", llama_block=False,
    ),
    Architecture(
        MODEL_ARCH.GEMMA3, ("gemma3", "gemma3_text"), gguf_qk_interleaved=False, hf_norm_offset=1.0,
        prune_refusal="sandwich norms (post-attention and post-FFN RMSNorm) and q/k norms have no attention-free "
        "form in stock llama.cpp's deci architecture", llama_block=False,
    ),
    Architecture(MODEL_ARCH.DECI, (), gguf_qk_interleaved=True, hf_norm_offset=0.0, scorable=False),
    Architecture(
        "granite_swa", (), gguf_qk_interleaved=True, hf_norm_offset=0.0, scorable=False,
        prune_refusal="a windowed file (granite_swa) keeps every layer's attention; prune the original model",
    ),
)

# Architectures outside the table that prune is asked for: why stock llama.cpp's deci graph cannot hold them.
OTHER_PRUNE_REFUSALS: dict[str, str] = {
    "gemma": "scales embeddings by sqrt(n_embd) and uses a GELU feed-forward; deci has neither",
    "gemma2": "sandwich norms (post-attention and post-FFN RMSNorm) and logit soft-capping have no deci form",
    "gemma3n": "sandwich norms, q/k norms and per-layer embeddings have no deci form",
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


def _by_name(name: object) -> Architecture | None:
    return next((arch for arch in ARCHITECTURES if arch.name == name), None)


def prunable_architecture(name: str) -> Architecture:
    """The table entry ``prune`` can rewrite as deci; an error naming the architecture and why not."""
    arch = _by_name(name)
    if arch is not None and arch.prune_refusal is None:
        return arch
    prunable = sorted(a.name for a in ARCHITECTURES if a.prune_refusal is None)
    reason = arch.prune_refusal if arch is not None else OTHER_PRUNE_REFUSALS.get(
        name, f"only {', '.join(prunable)} files have been verified to map onto llama.cpp's deci graph"
    )
    raise GatenormError(f"cannot prune architecture '{name}': {reason}")


def known_architecture(name: object, where: str) -> Architecture:
    """Any table entry (scorable or not): for the reference forward pass and RoPE layouts."""
    arch = _by_name(name)
    if arch is None:
        raise _unsupported(where, "architecture", name, [a.name for a in ARCHITECTURES])
    return arch


def _unsupported(where: str, kind: str, value: object, known: list[str]) -> GatenormError:
    return GatenormError(f"{where}: {kind} {value!r} is not supported (supported: {', '.join(known)})")


def refuse_mixture_of_experts(n_experts: object, where: str) -> None:
    """Refuse a mixture-of-experts model (GGUF ``expert_count``, HF ``num_local_experts`` or the like)."""
    if isinstance(n_experts, int | float) and n_experts > 0:
        raise GatenormError(
            f"{where}: mixture-of-experts models ({n_experts:g} experts per layer) are not supported: "
            "their FFN has no deci form, so they can be neither scored nor pruned"
        )


def architecture_for_gguf(name: object, where: str) -> Architecture:
    """The scorable architecture whose GGUF ``general.architecture`` is ``name``."""
    arch = _by_name(name)
    if arch is None or not arch.scorable:
        raise _unsupported(where, "architecture", name, [a.name for a in ARCHITECTURES if a.scorable])
    return arch


def architecture_for_hf(model_type: object, where: str) -> Architecture:
    """The architecture of an HF ``config.json`` whose ``model_type`` is ``model_type``."""
    for arch in ARCHITECTURES:
        if model_type in arch.hf_model_types:
            return arch
    raise _unsupported(where, "model_type", model_type, [t for a in ARCHITECTURES for t in a.hf_model_types])
