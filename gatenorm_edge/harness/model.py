"""Open a GGUF model in llama.cpp quietly, tokenize text as llama.cpp's tools do, and decode tokens to logits.

Every measurement (perplexity, KL divergence, speed, zero-shot) goes through ``open_model``: it checks the
file and the context size first (one-line errors instead of llama.cpp's log), silences llama.cpp's log
while keeping it in memory (the KV-cache size and load errors are read from it), and hands back a
``llama_cpp.Llama`` with a few low-level helpers: ``logits`` decodes a token sequence with outputs only
where they are needed, ``clear`` empties the KV cache, ``save_state``/``restore_state`` snapshot it.
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections import deque
from collections.abc import Collection
from pathlib import Path

import llama_cpp
import numpy as np

from ..errors import GatenormError
from ..sources.geometry import ModelGeometry
from ..sources import GGUFFile

DEFAULT_BATCH = 2048  # llama-perplexity's and llama-bench's default n_batch
DEFAULT_UBATCH = 512  # their default n_ubatch
KV_SIZE_LINE = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB")

_log_chunks: deque[str] = deque(maxlen=4000)


@llama_cpp.llama_log_callback
def _keep_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    _log_chunks.append(text.decode("utf-8", "replace"))


llama_cpp.llama_log_set(_keep_log, ctypes.c_void_p(0))


def llama_log_lines() -> list[str]:
    """What llama.cpp logged since the last model was opened (kept in memory, never printed)."""
    return "".join(_log_chunks).splitlines()


def default_threads() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def training_context(gguf: GGUFFile) -> int | None:
    """The context length the model was trained with, from its metadata (None when absent)."""
    return ModelGeometry.from_gguf(gguf).context_length


def check_training_context(gguf: GGUFFile, tokens: int, what: str = "context") -> None:
    """A one-line error when ``tokens`` (a context, a depth) is beyond the model's training context."""
    trained = training_context(gguf)
    if trained is not None and tokens > trained:
        raise GatenormError(f"{what} {tokens} exceeds {Path(gguf.path).name}'s training context of {trained} tokens")


class LoadedModel(llama_cpp.Llama):
    """A ``llama_cpp.Llama`` plus what loading it reported (time, KV-cache bytes) and batch decoding."""

    def __init__(
        self, gguf: GGUFFile, *, n_ctx: int, flash_attn: bool, logits_all: bool, n_threads: int
    ) -> None:
        path = gguf.path
        self.path = path
        self.flash_attn = flash_attn
        n_batch = min(n_ctx, DEFAULT_BATCH)
        _log_chunks.clear()
        started = time.perf_counter()
        try:
            super().__init__(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=min(n_batch, DEFAULT_UBATCH),
                n_threads=n_threads,
                n_threads_batch=n_threads,
                flash_attn=flash_attn,
                logits_all=logits_all,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            errors = [line for line in llama_log_lines() if "error" in line.lower()]
            reason = errors[-1].strip() if errors else str(exc)
            raise GatenormError(f"{path}: llama.cpp cannot load it ({reason})") from None
        self.load_seconds = time.perf_counter() - started
        self.kv_bytes = kv_cache_bytes(gguf, int(llama_cpp.llama_n_ctx(self.ctx)), flash_attn, llama_log_lines())
        self.vocab_size = self.n_vocab()
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.bos_token = int(llama_cpp.llama_vocab_bos(vocab)) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
        self._decode_batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        batch = getattr(self, "_decode_batch", None)
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
            self._decode_batch = None
        super().close()

    def tokenize_text(self, text: str) -> list[int]:
        """Tokens of ``text`` as llama.cpp's tools make them: BOS when the vocab adds one, no special parsing."""
        return self.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def clear(self) -> None:
        """Empty the KV cache (as llama-perplexity does before each chunk)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.n_tokens = 0

    def keep_prefix(self, n_tokens: int) -> None:
        """Cut sequence 0 of the KV cache back to its first ``n_tokens`` positions."""
        memory = llama_cpp.llama_get_memory(self.ctx)
        if not llama_cpp.llama_memory_seq_rm(memory, 0, n_tokens, -1):
            raise GatenormError(f"{self.path}: llama.cpp could not trim its KV cache to {n_tokens} tokens")
        self.n_tokens = n_tokens

    def logits(self, tokens: np.ndarray | list[int], *, start: int = 0, output_from: int | None = None) -> np.ndarray:
        """Decode ``tokens`` at positions ``start``, ``start+1``, ... (sequence 0) after what the cache holds.

        Returns float32 logits (rows x vocab) for the tokens at index ``output_from`` and after (default:
        the last token only); the others are computed without an output row, as llama.cpp's tools do.
        """
        count = len(tokens)
        first_output = count - 1 if output_from is None else output_from
        rows: list[np.ndarray] = []
        batch = self._decode_batch
        for offset in range(0, count, self.n_batch):
            size = min(self.n_batch, count - offset)
            batch.n_tokens = size
            n_outputs = 0
            for k in range(size):
                index = offset + k
                batch.token[k] = int(tokens[index])
                batch.pos[k] = start + index
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = 0
                wanted = index >= first_output
                batch.logits[k] = wanted
                n_outputs += wanted
            status = llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise GatenormError(f"{self.path}: llama.cpp failed to decode a batch (status {status})")
            if n_outputs:
                pointer = llama_cpp.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(pointer, shape=(n_outputs, self.vocab_size)).copy())
        self.n_tokens = start + count
        return np.concatenate(rows) if rows else np.empty((0, self.vocab_size), dtype=np.float32)

    def save_state(self) -> ctypes.Array:
        """A snapshot of sequence 0 in the KV cache (llama-bench keeps one per depth)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self.ctx, buffer, size, 0) != size:
            raise GatenormError(f"{self.path}: llama.cpp could not snapshot the KV cache")
        return buffer

    def restore_state(self, state: ctypes.Array, n_tokens: int) -> None:
        """Put a snapshot from ``save_state`` back into an emptied cache."""
        self.clear()
        if llama_cpp.llama_state_seq_set_data(self.ctx, state, len(state), 0) == 0:
            raise GatenormError(f"{self.path}: llama.cpp refused to restore a saved KV-cache state")
        self.n_tokens = n_tokens


def derived_kv_bytes(gguf: GGUFFile, cells: int, flash_attn: bool) -> int:
    """KV-cache bytes llama.cpp allocates for ``cells`` positions (f16 K and V), from the GGUF metadata.

    Per layer: cells x n_head_kv x head size x 2 bytes, for K and for V; a layer with 0 KV heads
    (attention-free) costs nothing. Head sizes come from layer 0, as llama.cpp takes them. Without
    flash attention llama.cpp stores V transposed and pads every layer's V, attention-free ones
    included, to the widest layer.
    """
    return geometry_kv_bytes(ModelGeometry.from_gguf(gguf), cells, flash_attn)


def geometry_kv_bytes(g: ModelGeometry, cells: int, flash_attn: bool, removed: Collection[int] = ()) -> int:
    """``derived_kv_bytes`` of a geometry whose ``removed`` layers are also attention-free."""
    kv_heads = [0 if layer in removed else n for layer, n in enumerate(g.head_count_kv)]
    k_widths = [n * g.head_dim for n in kv_heads]
    v_widths = [n * g.value_dim for n in kv_heads]
    if not flash_attn:
        v_widths = [max(v_widths)] * g.n_layers
    return 2 * cells * (sum(k_widths) + sum(v_widths))


def kv_cache_bytes(gguf: GGUFFile, cells: int, flash_attn: bool, log_lines: list[str]) -> int | None:
    """The KV-cache size llama.cpp reported (``llama_kv_cache: size = X MiB``), to the byte.

    llama.cpp prints MiB with two decimals; when the metadata-derived size agrees within that rounding
    it is the exact figure, otherwise (caches we do not model, e.g. sliding-window) the printed one.
    """
    reported = [float(match[1]) for line in log_lines if (match := KV_SIZE_LINE.search(line))]
    if not reported:
        return None
    try:
        derived = derived_kv_bytes(gguf, cells, flash_attn)
    except (GatenormError, TypeError, ValueError, ZeroDivisionError):
        derived = None
    printed = sum(reported) * 2**20
    half_step = 0.00501 * 2**20  # half of the printed 0.01 MiB, plus float slack for exact halves like 0.125
    if derived is not None and abs(derived - printed) <= half_step * len(reported):
        return derived
    return round(printed)


def open_model(
    path: Path | str,
    *,
    n_ctx: int,
    flash_attn: bool = True,
    logits_all: bool = False,
    n_threads: int | None = None,
) -> LoadedModel:
    """Load a GGUF in llama.cpp with its log silenced; one-line errors for bad files and contexts.

    ``flash_attn`` True forces flash attention on (llama-perplexity's CPU default resolves to on);
    without it llama.cpp pads every layer's V cache to the widest layer, hiding attention-free layers.
    """
    path = Path(path)
    gguf = GGUFFile(path)
    if n_ctx < 1:
        raise GatenormError(f"context size must be positive, got {n_ctx}")
    check_training_context(gguf, n_ctx)
    return LoadedModel(
        gguf, n_ctx=n_ctx, flash_attn=flash_attn, logits_all=logits_all, n_threads=n_threads or default_threads()
    )
