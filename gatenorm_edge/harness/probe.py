"""Read and edit a model's residual stream inside llama.cpp, so pruning can be tried without rewriting a file.

llama.cpp names the intermediate tensors of its llama and qwen2 graphs ``attn_norm-L`` (the normed input of
layer L's attention), ``ffn_inp-L`` (the residual stream after L's attention: input + attention output)
and ``l_out-L`` (the stream leaving layer L). Its scheduler's evaluation callback asks, node by node,
whether we want to see a tensor; for those we do, it stops the graph after computing it, hands it to us,
and only then runs the nodes that read it. Writing into the tensor there is writing into the model:

- *drop* layer L's attention: ``ffn_inp-L := l_out-(L-1)`` (what the attention-free ``deci`` layer computes);
- *patch* it: ``ffn_inp-L := l_out-(L-1) + W @ attn_norm-L`` (``deci`` linear attention, x + W·norm(x));
- *capture* it: keep ``attn_norm-L`` and the attention output ``ffn_inp-L - l_out-(L-1)`` of every token;
- *capture its Q, K and V* (``Qcur-L`` after RoPE, ``Kcur-L``, ``Vcur-L``: the last tensors of those names);
- *window* it: ``ffn_inp-L := l_out-(L-1) + W_O @ windowed_attention(Q, K, V)``, the attention a granite_swa
  layer computes (a window of W tokens, per-head sink logits), recomputed in NumPy from llama.cpp's own Q/K/V.

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
from .logprobs import log_softmax, row_blocks
from .model import LoadedModel, interrupts_held

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


def tensor_rows(pointer: int, rows: int | None = None) -> np.ndarray:
    """A writable (tokens, width) float32 view of a contiguous ggml tensor: 2-D, or (with ``rows``, the number of
    tokens) 3-D with the tokens outermost, as (head size, heads, tokens)."""
    head = GgmlTensorHead.from_address(pointer)
    ne = [int(n) for n in head.ne]
    total = ne[0] * ne[1] * ne[2] * ne[3]
    rows = ne[1] if rows is None else rows
    strides_ok = head.nb[0] == 4 and head.nb[1] == 4 * ne[0] and head.nb[2] == 4 * ne[0] * ne[1]
    if head.type != GGML_TYPE_F32 or not strides_ok or total % rows or (rows == ne[1] and ne[2] * ne[3] != 1):
        raise GatenormError(f"llama.cpp tensor {head.name.decode()} is not a contiguous float32 matrix of {rows} rows")
    buffer = (ctypes.c_float * total).from_address(head.data)
    return np.ctypeslib.as_array(buffer).reshape(rows, total // rows)


@dataclass(frozen=True)
class WindowEdit:
    """A layer that sees only the last ``window`` tokens, with per-head ``sinks`` logits; ``output`` is its
    attention output matrix W_O (n_embd x heads*head_size, float32), ``bias`` its output bias if any."""

    window: int
    sinks: np.ndarray
    output: np.ndarray
    bias: np.ndarray | None = None


def windowed_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int, sinks: np.ndarray | None = None
) -> np.ndarray:
    """Causal attention in which query p sees keys p - window + 1 .. p, and head h's ``sinks[h]`` logit joins
    its softmax denominator. q: (tokens, heads, d), k and v: (tokens, kv heads, d); returns (tokens, heads*d)."""
    n, heads, d = q.shape
    group = heads // k.shape[1]
    distance = np.arange(n)[:, None] - np.arange(n)[None, :]
    hidden = (distance < 0) | (distance >= window)
    out = np.empty((n, heads, v.shape[2]), dtype=np.float32)
    for h in range(heads):
        scores = q[:, h] @ k[:, h // group].T / np.float32(np.sqrt(d))
        scores[hidden] = -np.inf
        top = scores.max(axis=1)
        if sinks is not None:
            top = np.maximum(top, sinks[h])
        weights = np.exp(scores - top[:, None])
        total = weights.sum(axis=1) + (0.0 if sinks is None else np.exp(sinks[h] - top))
        out[:, h] = (weights @ v[:, h // group]) / total[:, None]
    return out.reshape(n, -1)


@dataclass
class StreamEdits:
    """What to do to each layer's attention sublayer during a decode (layers >= 1).

    ``drop``: remove it; ``patch``: replace it by ``W @ attn_norm(x)`` (W is out x in); ``capture``: call
    ``on_capture(layer, x, attn_norm(x), attention output)`` (tokens x width, float32) before any edit;
    ``window``: recompute it as a windowed layer; ``capture_qkv``: call ``on_qkv(layer, q, k, v)`` (tokens x
    heads x head size) before any edit.
    """

    drop: frozenset[int] = frozenset()
    patch: Mapping[int, np.ndarray] = field(default_factory=dict)
    capture: frozenset[int] = frozenset()
    on_capture: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] = lambda layer, x, normed, attention: None
    window: Mapping[int, WindowEdit] = field(default_factory=dict)
    capture_qkv: frozenset[int] = frozenset()
    on_qkv: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] = lambda layer, q, k, v: None

    def layers(self) -> set[int]:
        return set(self.drop) | set(self.patch) | set(self.capture) | set(self.window) | set(self.capture_qkv)

    def qkv_layers(self) -> set[int]:
        return set(self.window) | set(self.capture_qkv)


def last_only(length: int) -> range:
    """The outputs of a pass that only captures: the last position's logits (llama.cpp needs one)."""
    return range(length - 1, length)


class StreamProbe:
    """A second llama.cpp context on a loaded model, decoding with ``StreamEdits``: one whole sequence at a time
    (``logits``, ``run``), or, with ``n_seq`` > 1, batches of tokens of many sequences (``decode``: sampling).

    Every decode is one llama.cpp micro-batch, so the tensors the edits see hold its tokens in batch order;
    a many-sequence decode must hold one token of each of sequences 0, 1, 2, ... (llama.cpp splits any other
    batch by sequence), which is what one step of sampling every sequence is.
    """

    def __init__(self, model: LoadedModel, n_ctx: int, n_seq: int = 1, n_batch: int | None = None) -> None:
        self.model = model
        self.edits = StreamEdits()
        self._wanted: dict[bytes, tuple[str, int]] = {}
        self._residual: dict[int, np.ndarray] = {}
        self._normed: dict[int, np.ndarray] = {}
        self._qkv: dict[tuple[str, int], np.ndarray] = {}
        self._tokens = 0
        self._raised: BaseException | None = None  # raised inside the callback, where ctypes would swallow it
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch or n_ctx
        params.n_seq_max = n_seq
        params.kv_unified = False  # each sequence attends over its own cells only
        params.n_threads = params.n_threads_batch = model.n_threads
        params.flash_attn_type = 1  # LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.cb_eval = self._callback
        params.cb_eval_user_data = None
        self.batch = None
        try:
            with interrupts_held():
                self.ctx = llama_cpp.llama_init_from_model(model.model, params)
        except KeyboardInterrupt:  # raised once the context exists: free it before the caller loses it
            self.close()
            raise
        if not self.ctx:
            raise GatenormError(f"{model.path}: llama.cpp could not create a {n_seq}-sequence context of {n_ctx} tokens")
        self.n_ctx = n_ctx
        self.n_batch = int(params.n_batch)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

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
        for layer in edits.qkv_layers():  # the last tensor of each name is the one attention reads
            for kind in "QKV":
                wanted[f"{kind}cur-{layer}".encode()] = (kind, layer)
        self._wanted = wanted

    def _on_tensor(self, pointer: int, ask: bool, user_data: ctypes.c_void_p) -> bool:
        """llama.cpp's per-tensor callback: an exception stops the graph and is raised again once
        ``llama_decode`` returns (ctypes would print and drop it)."""
        try:
            return self._look_at(pointer, ask)
        except BaseException as raised:  # noqa: BLE001 - re-raised by decode, never dropped
            self._raised = raised
            return False

    def _look_at(self, pointer: int, ask: bool) -> bool:
        name = GgmlTensorHead.from_address(pointer).name
        role = self._wanted.get(name)
        if ask or role is None:
            return role is not None
        kind, layer = role
        if kind in "QKV":
            self._qkv[kind, layer] = tensor_rows(pointer, self._tokens).copy()
            return True
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
        if layer in edits.qkv_layers():
            q, k, v = (self._qkv.pop((kind, layer)) for kind in "QKV")
            head_dim = self.model.geometry.head_dim
            q, k, v = (m.reshape(len(m), -1, head_dim) for m in (q, k, v))
            if layer in edits.capture_qkv:
                edits.on_qkv(layer, q, k, v)
            if layer in edits.window:
                edit = edits.window[layer]
                attended = windowed_attention(q, k, v, edit.window, edit.sinks) @ edit.output.T
                after[:] = residual + (attended if edit.bias is None else attended + edit.bias)
        if layer in edits.drop:
            after[:] = residual
        elif layer in edits.patch:
            after[:] = residual + normed @ edits.patch[layer].T

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> np.ndarray:
        """Decode (token, position, sequence, wants_logits) entries after what the cache holds, ``n_batch`` at a
        time; the logits of the wanted ones, in order."""
        rows: list[np.ndarray] = []
        for offset in range(0, len(entries), self.n_batch):
            part = entries[offset : offset + self.n_batch]
            self._tokens = self.batch.n_tokens = len(part)
            for k, (token, position, sequence, wanted) in enumerate(part):
                self.batch.token[k] = token
                self.batch.pos[k] = position
                self.batch.n_seq_id[k] = 1
                self.batch.seq_id[k][0] = sequence
                self.batch.logits[k] = wanted
            with interrupts_held():
                status = llama_cpp.llama_decode(self.ctx, self.batch)
            if self._raised is not None:
                raised, self._raised = self._raised, None
                raise raised
            if status != 0:
                raise GatenormError(f"{self.model.path}: llama.cpp failed to decode a batch (status {status})")
            wanted = sum(entry[3] for entry in part)
            if wanted:  # llama.cpp keeps the output rows in batch order
                pointer = llama_cpp.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(pointer, shape=(wanted, self.model.vocab_size)).copy())
        return np.concatenate(rows) if rows else np.empty((0, self.model.vocab_size), dtype=np.float32)

    def logits(self, tokens: Sequence[int], outputs: range | None = None) -> np.ndarray:
        """Decode ``tokens`` at positions 0.. from an empty cache with the current edits; the logits of the
        positions in ``outputs`` (default: every token), in order."""
        count = len(tokens)
        if not 0 < count <= self.n_ctx:
            raise GatenormError(f"a probe sequence must have 1..{self.n_ctx} tokens, not {count}")
        wanted = list(range(count) if outputs is None else outputs)
        # llama.cpp keeps only the output rows in the last layer's stream: an edit there needs every row out
        every_row = self.model.geometry.n_layers - 1 in self.edits.layers()
        rows = set(range(count)) if every_row else set(wanted)
        self.clear()
        logits = self.decode([(int(token), index, 0, index in rows) for index, token in enumerate(tokens)])
        return logits[wanted] if every_row else logits

    def run(
        self, sequences: Sequence[np.ndarray], edits: StreamEdits, on_logits: Callable[[int, np.ndarray], None],
        outputs: Callable[[int], range] | None = None,
    ) -> None:
        """Decode every sequence with ``edits``; ``on_logits(index, logits)`` sees each sequence's logits, of the
        positions ``outputs(length)`` gives (default: all)."""
        self.set_edits(edits)
        try:
            for index, sequence in enumerate(sequences):
                on_logits(index, self.logits(sequence, None if outputs is None else outputs(len(sequence))))
        finally:
            self._residual.clear()
            self._normed.clear()
            self._qkv.clear()


class HeldOutDivergence:
    """Mean KL(base || edited) over the scored positions of held-out sequences: the second half of each, every
    ``stride``-th position (the base model's log-probabilities are kept for those, in float32).

    The base pass may capture (``base_edits`` that edit nothing); ``after_each(index)`` runs after each of its
    sequences, while what was captured is still there.
    """

    def __init__(
        self, probe: StreamProbe, sequences: Sequence[np.ndarray], stride: int = 1,
        base_edits: StreamEdits | None = None, after_each: Callable[[int], None] = lambda index: None,
    ) -> None:
        self.probe = probe
        self.sequences = list(sequences)
        self.stride = stride
        self.base: list[np.ndarray] = []

        def keep(index: int, logits: np.ndarray) -> None:
            self.base.append(self._log_probs(logits))
            after_each(index)

        probe.run(self.sequences, base_edits or StreamEdits(), keep, self.scored)

    def scored(self, length: int) -> range:
        return range(length // 2, length, self.stride)

    @staticmethod
    def _log_probs(rows: np.ndarray) -> np.ndarray:
        out = np.empty(rows.shape, dtype=np.float32)
        for block in row_blocks(len(rows)):
            out[block] = log_softmax(rows[block])
        return out

    def __call__(self, edits: StreamEdits) -> float:
        total, count = 0.0, 0

        def on_logits(index: int, logits: np.ndarray) -> None:
            nonlocal total, count
            log_p = self.base[index]
            log_q = self._log_probs(logits)
            total += float(np.sum(np.exp(log_p.astype(np.float64)) * (log_p - log_q)))
            count += len(log_p)

        self.probe.run(self.sequences, edits, on_logits, self.scored)
        return total / count
