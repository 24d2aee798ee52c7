"""Open a GGUF model in llama.cpp quietly, tokenize text as llama.cpp's tools do, and decode tokens to logits.

Every measurement (perplexity, KL divergence, speed, zero-shot) goes through ``open_model``: it checks the
file and the context size first (one-line errors instead of llama.cpp's log), silences llama.cpp's log
while keeping it in memory (the KV-cache size and load errors are read from it), and hands back a
``llama_cpp.Llama`` with a few low-level helpers: ``logits`` decodes a token sequence with outputs only
where they are needed, ``clear`` empties the KV cache, ``save_state``/``restore_state`` snapshot it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Collection, Iterator
from pathlib import Path

import llama_cpp
import numpy as np

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import GatenormError
from ..options import CACHE_TYPES, DEFAULT_CACHE_TYPE
from ..sources.geometry import ModelGeometry
from ..sources import GGUFFile

DEFAULT_BATCH = 2048  # llama-perplexity's and llama-bench's default n_batch
DEFAULT_UBATCH = 512  # their default n_ubatch
SWA_PAGE = 256  # llama.cpp sizes a sliding-window cache in whole pages of this many cells
KV_SIZE_LINE = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB")

_log_chunks: deque[str] = deque(maxlen=4000)
_interrupted: list[int] = []  # Ctrl-C or SIGTERM that came while llama.cpp ran, raised once it returns


@llama_cpp.llama_log_callback
def _keep_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    try:
        _log_chunks.append(text.decode("utf-8", "replace"))
    except KeyboardInterrupt:  # outside interrupts_held: ctypes would drop it; the next held call raises it
        _interrupted.append(signal.SIGINT)


llama_cpp.llama_log_set(_keep_log, ctypes.c_void_p(0))


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while llama.cpp runs; raise KeyboardInterrupt once it returns if either came.

    Python runs a signal's handler at its next bytecode, which during a native call is inside one of our
    ctypes callbacks (llama.cpp's log, the probe's eval callback); raised there, ctypes would print and drop
    it, and a Ctrl-C while a model loads or a context is made would be lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = [number for number in (signal.SIGINT, signal.SIGTERM) if callable(signal.getsignal(number))]  # Python's
    previous = {number: signal.signal(number, lambda number, frame: _interrupted.append(number)) for number in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if _interrupted:
        _interrupted.clear()
        raise KeyboardInterrupt


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


def cache_ggml_type(cache_type: str) -> GGMLQuantizationType:
    """The ggml type of a KV-cache type name (``options.CACHE_TYPES``)."""
    return GGMLQuantizationType[cache_type.upper()]


def check_cache_type(cache_type: str, flash_attn: bool, gguf: GGUFFile | None = None) -> None:
    """A KV-cache type llama.cpp can make here: a known one, flash attention for a quantized V, whole blocks per head."""
    if cache_type not in CACHE_TYPES:
        raise GatenormError(f"--cache-type is one of {', '.join(CACHE_TYPES)}, not {cache_type!r}")
    if cache_type != DEFAULT_CACHE_TYPE and not flash_attn:
        raise GatenormError(f"a {cache_type} KV cache needs flash attention on: llama.cpp quantizes V only with it")
    block = GGML_QUANT_SIZES[cache_ggml_type(cache_type)][0]
    head_dim = None if gguf is None else ModelGeometry.from_gguf(gguf).head_dim
    if head_dim is not None and head_dim % block:
        raise GatenormError(
            f"a {cache_type} KV cache stores blocks of {block} numbers, which do not divide "
            f"{Path(gguf.path).name}'s head size of {head_dim}"
        )


def cache_type_fits(path: Path | str, cache_type: str, flash_attn: bool = True) -> bool:
    """Whether llama.cpp can give ``path`` a ``cache_type`` KV cache (``check_cache_type`` passes)."""
    try:
        check_cache_type(cache_type, flash_attn, GGUFFile(path))
    except GatenormError:
        return False
    return True


class LoadedModel(llama_cpp.Llama):
    """A ``llama_cpp.Llama`` plus what loading it reported (time, KV-cache bytes) and batch decoding.

    A file with sliding-window layers (granite_swa) gets llama.cpp's small SWA cache (``swa_full`` off, as
    llama-bench and llama-perplexity have it): without that, llama-cpp-python gives every layer a full cache.
    """

    def __init__(
        self, gguf: GGUFFile, *, n_ctx: int, flash_attn: bool, logits_all: bool, n_threads: int,
        cache_type: str = DEFAULT_CACHE_TYPE,
    ) -> None:
        path = gguf.path
        self.path = path
        self.flash_attn = flash_attn
        self.cache_type = cache_type
        self.geometry = geometry = ModelGeometry.from_gguf(gguf)
        kv_type = int(cache_ggml_type(cache_type))
        n_batch = min(n_ctx, DEFAULT_BATCH)
        _log_chunks.clear()
        started = time.perf_counter()
        try:
            with interrupts_held():
                super().__init__(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_batch=n_batch,
                    n_ubatch=min(n_batch, DEFAULT_UBATCH),
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    flash_attn=flash_attn,
                    logits_all=logits_all,
                    swa_full=False if geometry.windowed else None,
                    type_k=kv_type,
                    type_v=kv_type,
                    verbose=False,
                )
        except (ValueError, RuntimeError) as exc:
            errors = [line for line in llama_log_lines() if "error" in line.lower()]
            reason = errors[-1].strip() if errors else str(exc)
            raise GatenormError(f"{path}: llama.cpp cannot load it ({reason})") from None
        self.load_seconds = time.perf_counter() - started
        self.kv_bytes = kv_cache_bytes(
            geometry, int(llama_cpp.llama_n_ctx(self.ctx)), flash_attn, cache_type, int(self.context_params.n_ubatch), llama_log_lines()
        )
        self.vocab_size = self.n_vocab()
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.bos_token = int(llama_cpp.llama_vocab_bos(vocab)) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
        self._decode_batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        batch = getattr(self, "_decode_batch", None)
        if batch is not None:
            llama_cpp.llama_batch_free(batch)
            self._decode_batch = None
        super().close()  # never held: Llama.__del__ calls it, and Python drops what __del__ raises

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
            with interrupts_held():
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


def geometry_kv_bytes(
    g: ModelGeometry, cells: int, flash_attn: bool, removed: Collection[int] = (), *,
    cache_type: str = DEFAULT_CACHE_TYPE, windowed: Collection[int] | None = None, window: int | None = None,
    ubatch: int = DEFAULT_UBATCH,
) -> int:
    """KV-cache bytes llama.cpp allocates for ``cells`` positions, from the geometry alone.

    Per layer: cells x n_head_kv x head size, in the cache type's row size, for K and for V; a layer with
    0 KV heads (attention-free, or ``removed``) costs nothing. Head sizes come from layer 0, as llama.cpp
    takes them. Without flash attention llama.cpp stores V transposed and pads every layer's V,
    attention-free ones included, to the widest layer. A windowed layer (``windowed``, default the file's
    own) holds the window and one micro-batch of ``ubatch`` tokens, in whole pages of 256 cells, never more
    than ``cells``.
    """
    windowed = g.windowed if windowed is None else windowed
    window = g.window if window is None else window
    block, type_size = GGML_QUANT_SIZES[cache_ggml_type(cache_type)]
    kv_heads = [0 if layer in removed else n for layer, n in enumerate(g.head_count_kv)]
    k_widths = [n * g.head_dim for n in kv_heads]
    v_widths = [n * g.value_dim for n in kv_heads]
    if not flash_attn:
        v_widths = [max(v_widths)] * g.n_layers
    swa_cells = min(cells, -(-(window + ubatch) // SWA_PAGE) * SWA_PAGE) if windowed else cells
    total = 0
    for layer in range(g.n_layers):
        layer_cells = swa_cells if layer in windowed else cells
        total += layer_cells * (k_widths[layer] + v_widths[layer]) // block * type_size
    return total


def kv_cache_bytes(
    g: ModelGeometry, cells: int, flash_attn: bool, cache_type: str, ubatch: int, log_lines: list[str]
) -> int | None:
    """The KV-cache size llama.cpp reported (``llama_kv_cache: size = X MiB``, one line per cache), to the byte.

    llama.cpp prints MiB with two decimals; when the geometry-derived size agrees within that rounding
    it is the exact figure, otherwise (caches we do not model) the printed one.
    """
    reported = [float(match[1]) for line in log_lines if (match := KV_SIZE_LINE.search(line))]
    if not reported:
        return None
    try:
        derived = geometry_kv_bytes(g, cells, flash_attn, cache_type=cache_type, ubatch=ubatch)
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
    cache_type: str = DEFAULT_CACHE_TYPE,
) -> LoadedModel:
    """Load a GGUF in llama.cpp with its log silenced; one-line errors for bad files and contexts.

    ``flash_attn`` True forces flash attention on (llama-perplexity's CPU default resolves to on);
    without it llama.cpp pads every layer's V cache to the widest layer, hiding attention-free layers.
    ``cache_type`` is the KV cache's type for K and V (llama.cpp's ``-ctk``/``-ctv``).
    """
    path = Path(path)
    gguf = GGUFFile(path)
    if n_ctx < 1:
        raise GatenormError(f"context size must be positive, got {n_ctx}")
    check_training_context(gguf, n_ctx)
    check_cache_type(cache_type, flash_attn, gguf)
    return LoadedModel(
        gguf, n_ctx=n_ctx, flash_attn=flash_attn, logits_all=logits_all, n_threads=n_threads or default_threads(),
        cache_type=cache_type,
    )
