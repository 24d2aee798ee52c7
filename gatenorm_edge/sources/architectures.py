"""The architectures we can score, and where their attention tensors live in GGUF and HF naming.

Tensor names and the HF -> GGUF name map come from the ``gguf`` package (``TENSOR_NAMES``,
``TensorNameMap``); this table only adds what it lacks: which HF ``model_type`` values belong to
which GGUF architecture, the Q/K row layout of the GGUF files, and gemma's ``1 + w`` norm storage.
llama (and mistral, which llama.cpp converts to the llama architecture) and qwen2 can later be
rewritten to attention-free layers; qwen3 and gemma3 are for scoring only.
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

    model_arch: MODEL_ARCH
    hf_model_types: tuple[str, ...]
    gguf_qk_interleaved: bool
    """True when GGUF Q/K rows are in llama.cpp's interleaved RoPE order (see ``rope_layout``)."""
    hf_norm_offset: float
    """Added to an HF RMSNorm weight to get the gain it multiplies by (gemma stores ``gain - 1``)."""

    @property
    def name(self) -> str:
        """The GGUF ``general.architecture`` value."""
        return MODEL_ARCH_NAMES[self.model_arch]

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
    Architecture(MODEL_ARCH.QWEN3, ("qwen3",), gguf_qk_interleaved=False, hf_norm_offset=0.0),
    Architecture(MODEL_ARCH.GEMMA3, ("gemma3", "gemma3_text"), gguf_qk_interleaved=False, hf_norm_offset=1.0),
)


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
    """The architecture whose GGUF ``general.architecture`` is ``name``."""
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise _unsupported(where, "architecture", name, [a.name for a in ARCHITECTURES])


def architecture_for_hf(model_type: object, where: str) -> Architecture:
    """The architecture of an HF ``config.json`` whose ``model_type`` is ``model_type``."""
    for arch in ARCHITECTURES:
        if model_type in arch.hf_model_types:
            return arch
    raise _unsupported(where, "model_type", model_type, [t for a in ARCHITECTURES for t in a.hf_model_types])
