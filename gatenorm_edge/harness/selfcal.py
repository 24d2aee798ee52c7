"""Calibration text every user has: sampled from the model itself, in parallel, seeded and cached.

``sample_calibration`` starts one sequence per prompt of ``STARTS`` (prose of many kinds, dialogue, a
letter, a recipe, an encyclopedia heading, a list, a little code and mathematics: varied, so that a coder
model does not write only code), and samples all of them together: one llama.cpp batch per step with one
token of every sequence, each under its own sequence id. Sampling is plain temperature sampling from the
model's full distribution with end-of-generation tokens removed, driven by NumPy's seeded generator, so
the same model, seed and sizes give the same tokens. Results are cached by the model's sha256 and the
settings under ``~/.cache/gatenorm-edge/calibration``, sealed (``cache``): written atomically, never half an
entry, and a damaged entry is sampled again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from ..errors import GatenormError
from ..cache import read_entry, write_entry
from ..fileio import cache_folder, file_sha256
from .model import LoadedModel
from .text import bos_chunk
from ..progress import progress_bar

STARTS = (
    "Once upon a time, ",
    "The history of the town begins in",
    "In 1998, the company announced that",
    "Scientists have discovered that",
    "Dear Sarah,\n\nThank you for your letter.",
    "Q: Why is the sky blue?\nA:",
    "Chapter 1\n\nThe rain had not stopped for",
    " = Early life = \n\n",
    "To make the bread, you will need",
    "She opened the door and",
    "According to the report,",
    "The main reasons are:\n1.",
    "Interviewer: What made you start?\n",
    "In mathematics, a prime number is",
    "def main():\n",
    "The weather forecast for tomorrow:",
)
STARTS_VERSION = 2  # bump when STARTS or the sampling rule change: it is part of the cache key
DEFAULT_SEQUENCES = len(STARTS)
DEFAULT_SEQ_LEN = 256
DEFAULT_SEED = 0
MAX_EOG_SHARE = 0.5  # mean probability on end-of-generation tokens above which samples are degenerate
MIN_DISTINCT_SHARE = 0.1  # distinct tokens per token below which a sequence is degenerate
EARLY_CHECK_STEPS = 16  # a model that would end almost every sequence is refused after this many steps


@dataclass(frozen=True)
class Calibration:
    """Calibration token sequences (each as the model sees it, BOS first where the vocab adds one) and provenance."""

    source: str  # "self-sampled" or the text file's path
    sha256: str  # of the text (sampled: of the token ids' bytes)
    sequences: tuple[tuple[int, ...], ...]
    settings: dict[str, Any]  # how it was made, as recorded in the JSON (sampled: also part of the cache key)
    cached: bool | None = None  # sampled: whether it came from the cache; None for a text file

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def arrays(self) -> list[np.ndarray]:
        return [np.asarray(s, dtype=np.int64) for s in self.sequences]

    def record(self) -> CalibrationRecord:
        return CalibrationRecord(self.source, self.sha256, self.tokens, len(self.sequences), self.settings, self.cached)


@dataclass(frozen=True)
class CalibrationRecord:
    """What an output records of the calibration it was made with (JSON and ``gatenorm.calibration.*``)."""

    source: str
    sha256: str
    tokens: int
    sequences: int
    settings: dict[str, Any]
    cached: bool | None

    def to_dict(self) -> dict[str, Any]:
        cached = {} if self.cached is None else {"cached": self.cached}
        return {"source": self.source, "sha256": self.sha256, "tokens": self.tokens, "sequences": self.sequences} | (
            self.settings | cached
        )


def _token_digest(sequences: tuple[tuple[int, ...], ...]) -> str:
    digest = hashlib.sha256()
    for sequence in sequences:
        digest.update(np.asarray(sequence, dtype="<i4").tobytes() + b"\xff\xff\xff\xff")
    return digest.hexdigest()


def _sampler_tables(model: LoadedModel) -> tuple[np.ndarray, list[int], int]:
    """Which tokens end generation, the tokens every sequence starts with (BOS where the vocab adds one),
    and the token an empty start text begins from (BOS, else end-of-text, as a document boundary)."""
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    end = np.array([bool(llama_cpp.llama_vocab_is_eog(vocab, t)) for t in range(model.vocab_size)])
    boundary = int(llama_cpp.llama_vocab_bos(vocab))
    if boundary < 0:
        boundary = int(llama_cpp.llama_vocab_eos(vocab))
    return end, ([model.bos_token] if model.bos_token is not None else []), boundary


def _sample_rows(
    logits: np.ndarray, end: np.ndarray, rng: np.random.Generator, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """One token per row (end-of-generation excluded) and each row's probability on end-of-generation."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=1, keepdims=True)
    eog_share = probs[:, end].sum(axis=1)
    probs[:, end] = 0.0
    kept = probs.sum(axis=1, keepdims=True)
    if np.any(kept <= 0):
        return np.full(len(probs), -1), eog_share
    cumulative = np.cumsum(probs / kept, axis=1)
    draws = rng.random(len(probs))[:, None]
    tokens = np.minimum((cumulative < draws).sum(axis=1), probs.shape[1] - 1)
    return tokens, eog_share


class _Batch:
    """A multi-sequence llama.cpp context: prefill prompts, then one token per sequence per decode."""

    def __init__(self, model: LoadedModel, n_seq: int, n_ctx: int) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(n_ctx, 2048)
        params.n_seq_max = n_seq
        params.kv_unified = False  # each sequence attends over its own cells only
        params.n_threads = params.n_threads_batch = model.n_threads
        params.flash_attn_type = 1
        self.model = model
        self.ctx = llama_cpp.llama_init_from_model(model.model, params)
        if not self.ctx:
            raise GatenormError(f"{model.path}: llama.cpp could not create a {n_seq}-sequence sampling context")
        self.n_batch = int(params.n_batch)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Decode (token, position, sequence, wants_logits) entries; logits of the wanted ones, in order."""
        rows: list[np.ndarray] = []
        for offset in range(0, len(entries), self.n_batch):
            part = entries[offset : offset + self.n_batch]
            self.batch.n_tokens = len(part)
            for k, (token, position, sequence, wanted) in enumerate(part):
                self.batch.token[k] = token
                self.batch.pos[k] = position
                self.batch.n_seq_id[k] = 1
                self.batch.seq_id[k][0] = sequence
                self.batch.logits[k] = wanted
            status = llama_cpp.llama_decode(self.ctx, self.batch)
            if status != 0:
                raise GatenormError(f"{self.model.path}: llama.cpp failed to decode a sampling batch (status {status})")
            wanted = sum(entry[3] for entry in part)
            if wanted:  # llama.cpp keeps the output rows in batch order
                pointer = llama_cpp.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(pointer, shape=(wanted, self.model.vocab_size)).copy())
        return np.concatenate(rows)


def sample_sequences(
    model: LoadedModel,
    starts: tuple[str, ...],
    seq_len: int,
    seed: int,
    temperature: float = 1.0,
    progress: bool = False,
    label: str = "sampling calibration text",
) -> tuple[tuple[int, ...], ...]:
    """One sequence of ``seq_len`` tokens per start text: BOS (if any), the start's tokens, then samples."""
    end, lead, boundary = _sampler_tables(model)
    prompts = [lead + model.tokenize(start.encode("utf-8"), add_bos=False, special=False) for start in starts]
    prompts = [prompt or [boundary] for prompt in prompts]
    if max(len(p) for p in prompts) >= seq_len:
        raise GatenormError(f"calibration sequences of {seq_len} tokens are shorter than their start texts")
    rng = np.random.default_rng(seed)
    sequences = [list(p) for p in prompts]
    batch = _Batch(model, len(prompts), len(prompts) * seq_len)
    eog_shares: list[np.ndarray] = []
    try:
        entries = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        logits = batch.decode(entries)
        steps = seq_len - min(len(p) for p in prompts)
        with progress_bar(label, steps, progress) as tick:
            while True:
                active = [s for s, seq in enumerate(sequences) if len(seq) < seq_len]
                if not active:
                    break
                tokens, eog = _sample_rows(logits, end, rng, temperature)
                eog_shares.append(eog)
                if np.any(tokens < 0) or len(eog_shares) == EARLY_CHECK_STEPS:
                    check_end_of_generation(model.path, np.concatenate(eog_shares), all_on_end=np.any(tokens < 0))
                entries = []
                for s, token in zip(active, tokens):
                    sequences[s].append(int(token))
                    if len(sequences[s]) < seq_len:
                        entries.append((int(token), len(sequences[s]) - 1, s, True))
                if entries:
                    logits = batch.decode(entries)
                tick()
            check_end_of_generation(model.path, np.concatenate(eog_shares))
            check_not_repetitive(model.path, sequences, [len(p) for p in prompts])
    finally:
        batch.close()
    return tuple(tuple(seq) for seq in sequences)


def check_end_of_generation(path: Path, eog_shares: np.ndarray, all_on_end: bool = False) -> None:
    """Refuse a model whose samples would mostly have ended: too much probability on end-of-generation."""
    share = 1.0 if all_on_end else float(eog_shares.mean())
    if share > MAX_EOG_SHARE:
        raise GatenormError(
            f"{path}: the model's own samples degenerate (it puts {share:.0%} of its probability on "
            "end-of-generation tokens); give calibration text with --calib"
        )


def check_not_repetitive(path: Path, sequences: list[list[int]], prompt_lengths: list[int]) -> None:
    """Refuse samples where most sequences repeat a few tokens over and over."""
    distinct = [len(set(seq[n:])) / max(1, len(seq) - n) for seq, n in zip(sequences, prompt_lengths)]
    poor = sum(d < MIN_DISTINCT_SHARE for d in distinct)
    if poor * 2 > len(sequences):
        raise GatenormError(
            f"{path}: the model's own samples degenerate ({poor} of {len(sequences)} sequences repeat a few tokens "
            "over and over); give calibration text with --calib"
        )


def self_calibration(
    model: LoadedModel,
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = DEFAULT_SEED,
    starts: tuple[str, ...] = STARTS,
    cache_dir: Path | None = None,
    model_sha256: str | None = None,
    progress: bool = False,
    label: str = "sampling calibration text",
) -> Calibration:
    """Sampled calibration for ``model``, from the cache when this model, seed and size were sampled before."""
    model_sha256 = model_sha256 or file_sha256(model.path)
    settings = {"seed": seed, "seq_len": seq_len, "starts_version": STARTS_VERSION, "temperature": 1.0}
    key = hashlib.sha256(json.dumps([model_sha256, settings, list(starts)]).encode()).hexdigest()[:16]
    cache = (cache_dir or cache_folder("calibration")) / f"{model_sha256[:16]}-{key}.json"
    stored = read_entry(cache, "calibration")
    if stored is not None:
        sequences = tuple(tuple(int(t) for t in s) for s in stored["sequences"])
        return Calibration("self-sampled", stored["sha256"], sequences, settings, cached=True)
    sequences = sample_sequences(model, starts, seq_len, seed, progress=progress, label=label)
    digest = _token_digest(sequences)
    write_entry(cache, {"model_sha256": model_sha256, "settings": settings, "sha256": digest, "sequences": sequences})
    return Calibration("self-sampled", digest, sequences, settings, cached=False)


def text_calibration(model: LoadedModel, path: Path, text: str, seq_len: int, n_seq: int) -> Calibration:
    """The first ``n_seq`` chunks of ``seq_len`` tokens of a user's text, cut as perplexity chunks are (``bos_chunk``)."""
    tokens = np.asarray(model.tokenize_text(text), dtype=np.int64)
    if len(tokens) < n_seq * seq_len:
        raise GatenormError(
            f"{path}: {len(tokens)} tokens; calibration needs {n_seq * seq_len} ({n_seq} x {seq_len}); give a longer text"
        )
    sequences = tuple(tuple(bos_chunk(tokens, i, seq_len, model.bos_token).tolist()) for i in range(n_seq))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Calibration(str(path), digest, sequences, {"seq_len": seq_len})



def sampled_text(model: LoadedModel, n_tokens: int, *, seed: int, segment: int) -> str:
    """At least ``n_tokens`` tokens of text sampled from the model, from the beginning of text, in segments
    of ``segment`` tokens joined by blank lines (the demo's evaluation text when no other is at hand)."""
    n_segments = -(-n_tokens // (segment - 1))
    sequences = sample_sequences(model, ("",) * n_segments, segment, seed)
    return "\n\n".join(model.detokenize(list(s[1:])).decode("utf-8", "replace").strip() for s in sequences)
