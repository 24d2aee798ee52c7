"""Read and edit a model's residual stream inside llama.cpp, so pruning can be tried without rewriting a file.

llama.cpp names the intermediate tensors of its llama and qwen2 graphs ``attn_norm-L`` (the normed input of
layer L's attention), ``ffn_inp-L`` (the residual stream after L's attention: input + attention output)
and ``l_out-L`` (the stream leaving layer L). Its scheduler's evaluation callback asks, node by node,
whether we want to see a tensor; for those we do, it stops the graph after computing it, hands it to us,
and only then runs the nodes that read it. Writing into the tensor there is writing into the model:

- *drop* layer L's attention: ``ffn_inp-L := l_out-(L-1)`` (what the attention-free ``deci`` layer computes);
- *patch* it: ``ffn_inp-L := l_out-(L-1) + W @ attn_norm-L`` (``deci`` linear attention, x + W·norm(x));
- *capture* it: keep ``attn_norm-L`` and the attention output ``ffn_inp-L - l_out-(L-1)`` of every token.

One context on an already loaded model does all of this for any set of layers, with the model's own
quantized arithmetic. Layer 0 has no ``l_out`` before it and is never edited (it cannot be pruned).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from ..errors import GatenormError
from .model import LoadedModel

GGML_TYPE_F32 = 0


class GgmlTensorHead(ctypes.Structure):
    """The leading fields of ggml's ``struct ggml_tensor`` (ggml.h), up to and including its name."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
    ]


def tensor_rows(pointer: int) -> np.ndarray:
    """A writable (tokens, width) float32 view of a contiguous 2-D ggml tensor."""
    head = GgmlTensorHead.from_address(pointer)
    width, rows = int(head.ne[0]), int(head.ne[1])
    if head.type != GGML_TYPE_F32 or head.nb[0] != 4 or head.nb[1] != 4 * width or head.ne[2] * head.ne[3] != 1:
        raise GatenormError(f"llama.cpp tensor {head.name.decode()} is not a contiguous float32 matrix")
    buffer = (ctypes.c_float * (width * rows)).from_address(head.data)
    return np.ctypeslib.as_array(buffer).reshape(rows, width)


@dataclass
class StreamEdits:
    """What to do to each layer's attention sublayer during a decode (layers >= 1).

    ``drop``: remove it; ``patch``: replace it by ``W @ attn_norm(x)`` (W is out x in); ``capture``: call
    ``on_capture(layer, x, attn_norm(x), attention output)`` (tokens x width, float32) before any edit.
    """

    drop: frozenset[int] = frozenset()
    patch: Mapping[int, np.ndarray] = field(default_factory=dict)
    capture: frozenset[int] = frozenset()
    on_capture: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] = lambda layer, x, normed, attention: None

    def layers(self) -> set[int]:
        return set(self.drop) | set(self.patch) | set(self.capture)


class StreamProbe:
    """A second llama.cpp context on a loaded model, decoding one sequence at a time with ``StreamEdits``."""

    def __init__(self, model: LoadedModel, n_ctx: int) -> None:
        self.model = model
        self.edits = StreamEdits()
        self._wanted: dict[bytes, tuple[str, int]] = {}
        self._residual: dict[int, np.ndarray] = {}
        self._normed: dict[int, np.ndarray] = {}
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = n_ctx
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = model.n_threads
        params.flash_attn_type = 1  # LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.cb_eval = self._callback
        params.cb_eval_user_data = None
        self.ctx = llama_cpp.llama_init_from_model(model.model, params)
        if not self.ctx:
            raise GatenormError(f"{model.path}: llama.cpp could not create a probing context of {n_ctx} tokens")
        self.n_ctx = n_ctx
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def set_edits(self, edits: StreamEdits) -> None:
        if 0 in edits.layers():
            raise GatenormError("layer 0's attention cannot be edited (llama.cpp takes the head size from it)")
        self.edits = edits
        wanted: dict[bytes, tuple[str, int]] = {}
        for layer in edits.layers():
            wanted[f"l_out-{layer - 1}".encode()] = ("residual", layer)
            wanted[f"attn_norm-{layer}".encode()] = ("normed", layer)
            wanted[f"ffn_inp-{layer}".encode()] = ("after", layer)
        self._wanted = wanted

    def _on_tensor(self, pointer: int, ask: bool, user_data: ctypes.c_void_p) -> bool:
        name = GgmlTensorHead.from_address(pointer).name
        role = self._wanted.get(name)
        if ask or role is None:
            return role is not None
        kind, layer = role
        rows = tensor_rows(pointer)
        if kind == "residual":
            self._residual[layer] = rows.copy()
        elif kind == "normed":
            self._normed[layer] = rows.copy()
        else:
            self._edit(layer, rows)
        return True

    def _edit(self, layer: int, after: np.ndarray) -> None:
        residual, normed = self._residual.pop(layer), self._normed.pop(layer)
        edits = self.edits
        if layer in edits.capture:
            edits.on_capture(layer, residual, normed, after - residual)
        if layer in edits.drop:
            after[:] = residual
        elif layer in edits.patch:
            after[:] = residual + normed @ edits.patch[layer].T

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Decode ``tokens`` at positions 0.. from an empty cache with the current edits; logits of every token."""
        count = len(tokens)
        if not 0 < count <= self.n_ctx:
            raise GatenormError(f"a probe sequence must have 1..{self.n_ctx} tokens, not {count}")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        batch = self.batch
        batch.n_tokens = count
        for index, token in enumerate(tokens):
            batch.token[index] = int(token)
            batch.pos[index] = index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = 0
            batch.logits[index] = True
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            raise GatenormError(f"{self.model.path}: llama.cpp failed to decode a probe batch (status {status})")
        pointer = llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(pointer, shape=(count, self.model.vocab_size)).copy()

    def run(self, sequences: Sequence[np.ndarray], edits: StreamEdits, on_logits: Callable[[int, np.ndarray], None]) -> None:
        """Decode every sequence with ``edits``; ``on_logits(index, logits)`` sees each sequence's logits."""
        self.set_edits(edits)
        try:
            for index, sequence in enumerate(sequences):
                on_logits(index, self.logits(sequence))
        finally:
            self._residual.clear()
            self._normed.clear()
