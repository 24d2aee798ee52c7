"""Evaluation texts: read a UTF-8 file as llama-perplexity does, or sample one from the model itself."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np

from ..errors import GatenormError
from .model import LoadedModel


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


def sample_text(model: LoadedModel, n_tokens: int, *, seed: int = 0, temperature: float = 1.0, segment: int = 512) -> str:
    """About ``n_tokens`` tokens of text sampled from ``model`` itself (data-free), reproducible for a seed.

    Sampling starts from BOS (or EOS when the vocab has no BOS) in independent segments of ``segment``
    tokens, never picks an end-of-generation token, and joins the segments with blank lines.
    """
    rng = np.random.default_rng(seed)
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    start_token = int(llama_cpp.llama_vocab_bos(vocab))
    if start_token < 0:
        start_token = int(llama_cpp.llama_vocab_eos(vocab))
    end_of_generation = np.array([llama_cpp.llama_vocab_is_eog(vocab, t) for t in range(model.vocab_size)])
    segments: list[str] = []
    produced = 0
    while produced < n_tokens:
        model.clear()
        tokens = [start_token]
        logits = model.logits(tokens)[-1]
        for _ in range(min(segment, model.n_ctx() - 1)):
            scaled = logits.astype(np.float64) / temperature
            scaled[end_of_generation] = -np.inf
            probs = np.exp(scaled - scaled.max())
            token = int(rng.choice(model.vocab_size, p=probs / probs.sum()))
            tokens.append(token)
            logits = model.logits([token], start=len(tokens) - 1)[-1]
        segments.append(model.detokenize(tokens[1:]).decode("utf-8", "replace").strip())
        produced += len(tokens) - 1
    return "\n\n".join(segments)
