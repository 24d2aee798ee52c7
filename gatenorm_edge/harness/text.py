"""Evaluation texts: read a UTF-8 file and cut its tokens into chunks, as llama-perplexity does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import GatenormError


def read_text(path: Path | str) -> str:
    """The file's text, with one trailing newline removed as llama.cpp's ``-f`` does; empty or non-UTF-8 is an error."""
    path = Path(path)
    if not path.is_file():
        raise GatenormError(f"{path}: no such text file")
    data = path.read_bytes()
    if data.endswith(b"\n"):
        data = data[:-1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GatenormError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise GatenormError(f"{path}: the text is empty")
    return text


def bos_chunk(tokens: np.ndarray, index: int, length: int, bos: int | None) -> np.ndarray:
    """Chunk ``index`` of ``length`` tokens, its first token replaced by BOS where the vocab adds one:
    llama-perplexity's rule, and the one rule every chunk here follows."""
    chunk = np.array(tokens[index * length : (index + 1) * length], dtype=np.int64)
    if bos is not None:
        chunk[0] = bos
    return chunk
