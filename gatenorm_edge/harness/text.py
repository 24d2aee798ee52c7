"""Evaluation texts: read a UTF-8 file as llama-perplexity does."""

from __future__ import annotations

from pathlib import Path

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
