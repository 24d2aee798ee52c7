"""Calibration text every user has: sampled from the model itself, in parallel, seeded and cached.

The prompts come from ``harness.prompts`` (``--calib-source``: BOS alone, start texts, chat requests through the
model's own template, or a mix). Groups of sequences are sampled together: one llama.cpp batch per step with
one token of every sequence, each under its own sequence id. Sampling (``Sampling``) is temperature sampling,
optionally within the top-p nucleus, from the model's distribution with end-of-generation tokens removed,
driven by NumPy's seeded generator, so the same model, seed and settings give the same tokens; optionally a
share of the samples the model itself finds least likely (highest perplexity) is dropped (Ji et al., ICLR 2025).
Results are cached by the model's sha256 and the settings under ``~/.cache/gatenorm-edge/calibration``, sealed
(``cache``): written atomically, never half an entry, and a damaged entry is sampled again. A long run seals
its progress after each group beside the entry (``.partial.json``); an interrupted run goes on from there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from ..errors import GatenormError
from ..options import DEFAULT_SELF_TOKENS
from ..cache import read_entry, write_entry
from ..fileio import cache_folder, file_sha256
from .model import LoadedModel
from .probe import StreamEdits, StreamProbe
from .prompts import PROMPTS_VERSION, prompt_set
from .text import bos_chunk
from ..progress import Ticker, progress_bar

SAMPLING_VERSION = 3  # bump when the sampling rule changes: it is part of the cache key
DEFAULT_SEQ_LEN = 256
DEFAULT_SEED = 0
DEFAULT_TOKENS = DEFAULT_SELF_TOKENS
GROUP = 64  # sequences sampled together in one llama.cpp context
TOP_CANDIDATES = 2048  # a nucleus is looked for among the most likely tokens first
MAX_EOG_SHARE = 0.5  # mean probability on end-of-generation tokens above which samples are degenerate
MIN_DISTINCT_SHARE = 0.1  # distinct tokens per token below which a sequence is degenerate
EARLY_CHECK_STEPS = 16  # a model that would end almost every sequence is refused after this many steps


@dataclass(frozen=True)
class Sampling:
    """How tokens are drawn: ``temperature``, the ``top_p`` nucleus (1.0: the whole distribution), and the share
    of sequences with the highest perplexity under the model that is sampled extra and dropped."""

    temperature: float = 1.0
    top_p: float = 1.0
    drop_worst: float = 0.0

    def check(self) -> None:
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and 0 <= self.drop_worst < 1):
            raise GatenormError(
                f"sampling needs a temperature above 0, top-p in (0, 1] and a dropped share in [0, 1), not "
                f"{self.temperature}, {self.top_p} and {self.drop_worst}"
            )


@dataclass(frozen=True)
class CalibrationSpec:
    """What self-sampled calibration to make: its prompt source, about how many tokens, in sequences of
    ``seq_len``, how they are sampled, and the seed."""

    source: str = "mix"
    tokens: int = DEFAULT_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    sampling: Sampling = Sampling()
    seed: int = DEFAULT_SEED

    @property
    def sequences(self) -> int:
        return max(1, -(-self.tokens // self.seq_len))


@dataclass(frozen=True)
class Calibration:
    """Calibration token sequences (each as the model sees it, BOS first where the vocab adds one) and provenance."""

    source: str  # "self-sampled" or the text file's path
    sha256: str  # of the text (sampled: of the token ids' bytes)
    sequences: tuple[tuple[int, ...], ...]
    settings: dict[str, Any]  # how it was made, as recorded in the JSON (sampled: also part of the cache key)
    cached: bool | None = None  # sampled: whether it came from the cache; None for a text file
    captured: bool = False  # whether a ``Capture`` saw every token of these sequences while they were sampled

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


def _nucleus(probs: np.ndarray, top_p: float) -> None:
    """Zero every row's tokens outside its top-p nucleus (the fewest most likely tokens holding ``top_p`` of the
    row's mass), in place; the most likely ``TOP_CANDIDATES`` are searched first, the whole row only if need be."""
    width = probs.shape[1]
    candidates = min(TOP_CANDIDATES, width)
    mass = probs.sum(axis=1)
    for row in range(len(probs)):
        top = np.argpartition(probs[row], width - candidates)[width - candidates :] if candidates < width else np.arange(width)
        order = top[np.argsort(probs[row, top])[::-1]]
        cumulative = np.cumsum(probs[row, order])
        if cumulative[-1] < top_p * mass[row]:  # a flat distribution: sort all of it
            order = np.argsort(probs[row])[::-1]
            cumulative = np.cumsum(probs[row, order])
        keep = order[: int(np.searchsorted(cumulative, top_p * mass[row])) + 1]
        kept = probs[row, keep]
        probs[row] = 0.0
        probs[row, keep] = kept


def _sample_rows(
    logits: np.ndarray, end: np.ndarray, rng: np.random.Generator, sampling: Sampling
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One token per row (end-of-generation excluded), each row's probability on end-of-generation, and the
    sampled token's negative log-likelihood under the model's own (untempered) distribution."""
    raw = logits.astype(np.float64)
    raw -= raw.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(raw).sum(axis=1))
    probs = np.exp(raw / sampling.temperature)
    probs /= probs.sum(axis=1, keepdims=True)
    eog_share = probs[:, end].sum(axis=1)
    probs[:, end] = 0.0
    if sampling.top_p < 1.0:
        _nucleus(probs, sampling.top_p)
    kept = probs.sum(axis=1, keepdims=True)
    if np.any(kept <= 0):
        return np.full(len(probs), -1), eog_share, np.zeros(len(probs))
    cumulative = np.cumsum(probs / kept, axis=1)
    draws = rng.random(len(probs))[:, None]
    tokens = np.minimum((cumulative < draws).sum(axis=1), probs.shape[1] - 1)
    return tokens, eog_share, log_z - raw[np.arange(len(raw)), tokens]


@dataclass(frozen=True)
class Samples:
    """Sampled sequences (each its prompt, then samples) and the mean NLL of each one's sampled tokens."""

    sequences: tuple[tuple[int, ...], ...]
    nll: tuple[float, ...]
    captured: bool  # whether the capture saw every token (not when the run went on from a checkpoint)


def sampler_tables(model: LoadedModel) -> tuple[np.ndarray, list[int], int]:
    """Which tokens end generation, the tokens a plain-text prompt starts with (BOS where the vocab adds one),
    and the token an empty prompt begins from (BOS, else end-of-text, as a document boundary)."""
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    end = np.array([bool(llama_cpp.llama_vocab_is_eog(vocab, t)) for t in range(model.vocab_size)])
    boundary = int(llama_cpp.llama_vocab_bos(vocab))
    if boundary < 0:
        boundary = int(llama_cpp.llama_vocab_eos(vocab))
    return end, ([model.bos_token] if model.bos_token is not None else []), boundary


@dataclass(frozen=True)
class Capture:
    """Edits that capture the residual stream while sampling, and what to do after each decode with the rows it
    captured: ``on_rows(sequences, real)``, each row's sequence index and whether it is a real token of that
    sequence (not a filler keeping a finished sequence in step)."""

    edits: StreamEdits
    on_rows: Callable[[np.ndarray, np.ndarray], None]


def sample_sequences(
    model: LoadedModel,
    prompts: Sequence[Sequence[int]],
    seq_len: int,
    seed: int,
    sampling: Sampling = Sampling(),
    progress: bool = False,
    label: str = "sampling calibration text",
    capture: Capture | None = None,
    checkpoint: Path | None = None,
) -> Samples:
    """One sequence of ``seq_len`` tokens per prompt: the prompt's tokens, then samples; ``GROUP`` at a time.
    With ``capture``, every token of every sequence passes its edits once, in order of position (so no second
    pass over the text is needed). With ``checkpoint``, the groups sampled so far and the generator's state are
    sealed there after each group but the last; a run that finds them goes on after them and gives the tokens
    of one unbroken run (its capture sees nothing then: it would miss the earlier groups)."""
    sampling.check()
    if max(len(p) for p in prompts) >= seq_len:
        raise GatenormError(f"calibration sequences of {seq_len} tokens are shorter than their prompts")
    end, _, _ = sampler_tables(model)
    rng = np.random.default_rng(seed)
    sequences: list[list[int]] = []
    nll: list[float] = []
    stored = read_entry(checkpoint, "calibration progress") if checkpoint is not None else None
    if stored is not None:
        sequences, nll = [list(seq) for seq in stored["sequences"]], list(stored["nll"])
        rng.bit_generator.state = stored["rng"]
        capture = None
    starts = range(0, len(prompts), GROUP)
    steps = [seq_len - min(len(p) for p in prompts[i : i + GROUP]) for i in starts]
    with progress_bar(label, sum(steps), progress) as tick:
        tick(sum(steps[: len(sequences) // GROUP]))
        for first in starts[len(sequences) // GROUP :]:
            group = [list(p) for p in prompts[first : first + GROUP]]
            done, sums = _sample_group(model, group, first, seq_len, end, rng, sampling, tick, capture)
            sequences += done
            nll += [total / (seq_len - len(p)) for total, p in zip(sums, group)]
            if checkpoint is not None and len(sequences) < len(prompts):
                write_entry(checkpoint, {"sequences": sequences, "nll": nll, "rng": rng.bit_generator.state})
    check_not_repetitive(model.path, sequences, [len(p) for p in prompts])
    return Samples(tuple(tuple(seq) for seq in sequences), tuple(nll), captured=capture is not None)


def _sample_group(
    model: LoadedModel, prompts: list[list[int]], first: int, seq_len: int, end: np.ndarray,
    rng: np.random.Generator, sampling: Sampling, tick: Ticker, capture: Capture | None,
) -> tuple[list[list[int]], list[float]]:
    """Sample one group of sequences (indices ``first``, ``first + 1``, ...) in one context; their tokens and each
    one's summed NLL. Each prompt is decoded on its own, then every step decodes one token of every sequence, in
    sequence order (a finished sequence repeats its last token, a filler), so each decode is one micro-batch
    whose rows the capture can tell apart; the last sampled tokens are decoded too, for the capture."""
    n = len(prompts)
    sequences = [list(p) for p in prompts]
    decoded = [0] * n  # tokens of each sequence the context has seen
    sums = [0.0] * n
    filler = seq_len + max(map(len, prompts)) - min(map(len, prompts)) + 1
    probe = StreamProbe(model, n * filler, n_seq=n, n_batch=min(n * filler, 2048))
    edits = capture.edits if capture is not None else StreamEdits()
    eog_shares: list[np.ndarray] = []
    try:
        probe.set_edits(edits)
        rows = []
        for s, prompt in enumerate(prompts):  # one micro-batch per prompt, every row out (for the last layer)
            rows.append(probe.decode([(t, i, s, True) for i, t in enumerate(prompt)])[-1])
            decoded[s] = len(prompt)
            if capture is not None:
                capture.on_rows(np.full(len(prompt), first + s), np.ones(len(prompt), dtype=bool))
        logits = np.stack(rows)
        while any(d < seq_len for d in decoded):
            active = [s for s in range(n) if len(sequences[s]) < seq_len]
            if active:
                tokens, eog, token_nll = _sample_rows(logits[active], end, rng, sampling)
                eog_shares.append(eog)
                if np.any(tokens < 0) or len(eog_shares) == EARLY_CHECK_STEPS:
                    check_end_of_generation(model.path, np.concatenate(eog_shares), all_on_end=bool(np.any(tokens < 0)))
                for s, token, cost in zip(active, tokens, token_nll):
                    sequences[s].append(int(token))
                    sums[s] += float(cost)
            real = np.array([decoded[s] < seq_len for s in range(n)])
            entries = [(sequences[s][min(decoded[s], seq_len - 1)], decoded[s], s, True) for s in range(n)]
            logits = probe.decode(entries)
            if capture is not None:
                capture.on_rows(np.arange(first, first + n), real)
            decoded = [d + 1 for d in decoded]
            tick()
        check_end_of_generation(model.path, np.concatenate(eog_shares))
    finally:
        probe.close()
    return sequences, sums


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
    spec: CalibrationSpec = CalibrationSpec(),
    *,
    cache_dir: Path | None = None,
    model_sha256: str | None = None,
    progress: bool = False,
    label: str = "sampling calibration text",
    capture: Capture | None = None,
) -> Calibration:
    """Sampled calibration for ``model``, from the cache when this model and ``spec`` were sampled before.
    ``capture`` sees every token while it is sampled, unless samples are to be dropped (or come from the cache).

    With ``spec.sampling.drop_worst`` = d, n / (1 - d) sequences are sampled and the d share with the highest
    mean NLL of their sampled tokens dropped; the others keep their order (the held-out ones stay spread over
    the prompt kinds)."""
    spec.sampling.check()
    model_sha256 = model_sha256 or file_sha256(model.path)
    _, lead, boundary = sampler_tables(model)
    wanted = spec.sequences
    drawn = wanted if spec.sampling.drop_worst == 0 else int(np.ceil(wanted / (1 - spec.sampling.drop_worst)))
    prompts = prompt_set(model, spec.source, drawn, lead, boundary)
    settings = {"prompts": prompts.source, "sequences": wanted, "seq_len": spec.seq_len, "seed": spec.seed,
                "temperature": spec.sampling.temperature, "top_p": spec.sampling.top_p,
                "drop_worst": spec.sampling.drop_worst, "prompts_version": PROMPTS_VERSION,
                "sampling_version": SAMPLING_VERSION} | ({"prompts_note": prompts.note} if prompts.note else {})
    key = hashlib.sha256(json.dumps([model_sha256, settings]).encode()).hexdigest()[:16]
    cache = (cache_dir or cache_folder("calibration")) / f"{model_sha256[:16]}-{key}.json"
    stored = read_entry(cache, "calibration")
    if stored is not None:
        sequences = tuple(tuple(int(t) for t in s) for s in stored["sequences"])
        return Calibration("self-sampled", stored["sha256"], sequences, settings, cached=True)
    capture = capture if spec.sampling.drop_worst == 0 else None
    checkpoint = cache.with_suffix(".partial.json")
    samples = sample_sequences(
        model, prompts.prompts, spec.seq_len, spec.seed, spec.sampling, progress, label, capture, checkpoint
    )
    keep = sorted(np.argsort(samples.nll, kind="stable")[:wanted])
    sequences = tuple(samples.sequences[i] for i in keep)
    digest = _token_digest(sequences)
    write_entry(cache, {"model_sha256": model_sha256, "settings": settings, "sha256": digest, "sequences": sequences})
    checkpoint.unlink(missing_ok=True)
    return Calibration("self-sampled", digest, sequences, settings, cached=False, captured=samples.captured)


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
    _, _, boundary = sampler_tables(model)
    n_segments = -(-n_tokens // (segment - 1))
    samples = sample_sequences(model, [[boundary]] * n_segments, segment, seed)
    return "\n\n".join(model.detokenize(list(s[1:])).decode("utf-8", "replace").strip() for s in samples.sequences)
