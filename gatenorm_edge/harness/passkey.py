"""Pass-key retrieval: what perplexity at 512 tokens cannot show, recall across thousands of tokens.

A random five-digit number is hidden at a chosen depth of filler text that fills the context; the prompt
ends by asking for it, the model answers by greedy decoding, and only an exact match counts. Trials go
round the depths in ``POSITIONS`` (0: right after the instruction, 1: right before the question). The
instruction and the filler up to the key are the same for every trial at one depth, so they are decoded
once per depth and kept in the KV cache while each trial decodes the rest.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np

from ..errors import GatenormError
from ..options import DEFAULT_CACHE_TYPE
from ..progress import progress_bar
from ..sources import GGUFFile
from .model import LoadedModel, check_training_context, open_model

INSTRUCTION = "A five-digit pass key is hidden in the long text below. Read all of it and remember the pass key.\n\n"
FILLER = "The old road climbs past the mill and over the hill. The river is slow here and the fields are wide. "
NEEDLE = "\nThe pass key is {key}. Remember it: {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
POSITIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_TOKENS = 8  # room left in the context for the answer
MIN_CTX = 256
DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class PasskeyTrial:
    """One trial: where the key was (depth and token index), what the model answered, whether it was right."""

    position: float
    key_token: int
    key: str
    answer: str
    correct: bool


@dataclass
class PasskeyResult:
    """``passkey``'s measurement; ``to_dict`` is the ``passkey --json`` contract."""

    model: str
    ctx: int
    flash_attn: bool
    prompt_tokens: int
    seconds: float
    details: list[PasskeyTrial] = field(default_factory=list)
    cache_type: str = DEFAULT_CACHE_TYPE

    @property
    def trials(self) -> int:
        return len(self.details)

    @property
    def accuracy(self) -> float:
        return sum(trial.correct for trial in self.details) / len(self.details)

    def by_position(self) -> list[tuple[float, float, int]]:
        """(depth, accuracy, trials) for each depth tried, in ``POSITIONS`` order."""
        rows = []
        for position in POSITIONS:
            hits = [trial.correct for trial in self.details if trial.position == position]
            if hits:
                rows.append((position, sum(hits) / len(hits), len(hits)))
        return rows

    def to_dict(self) -> dict:
        return {
            "model": self.model, "ctx": self.ctx, "trials": self.trials, "accuracy": self.accuracy,
            "by_position": [
                {"position": position, "accuracy": accuracy, "trials": n} for position, accuracy, n in self.by_position()
            ],
            "flash_attn": self.flash_attn, "cache_type": self.cache_type, "prompt_tokens": self.prompt_tokens,
            "seconds": self.seconds,
            "details": [asdict(trial) for trial in self.details],
        }


@dataclass(frozen=True)
class PromptParts:
    """The token pieces every prompt is made of, and how many filler repeats fill the context."""

    instruction: list[int]
    filler: list[int]
    question: list[int]
    repeats: int

    @classmethod
    def for_model(cls, model: LoadedModel, ctx: int) -> PromptParts:
        instruction = model.tokenize_text(INSTRUCTION)
        filler = _pieces(model, FILLER)
        question = _pieces(model, QUESTION)
        longest_needle = len(_pieces(model, NEEDLE.format(key="99999")))
        room = ctx - ANSWER_TOKENS - len(instruction) - len(question) - longest_needle - 2
        if room < len(filler):
            raise GatenormError(f"--ctx {ctx} leaves no room for filler text; give at least {MIN_CTX}")
        return cls(instruction, filler, question, room // len(filler))

    def prefix(self, position: float) -> list[int]:
        """The instruction and the filler before the key, for a key at ``position`` (0..1) of the filler."""
        return self.instruction + self.filler * round(position * self.repeats)

    def suffix(self, model: LoadedModel, position: float, key: str) -> list[int]:
        """The key sentence, the rest of the filler and the question."""
        after = self.repeats - round(position * self.repeats)
        return _pieces(model, NEEDLE.format(key=key)) + self.filler * after + self.question


def _pieces(model: LoadedModel, text: str) -> list[int]:
    return model.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def greedy_answer(model: LoadedModel, last_logits: np.ndarray) -> str:
    """Up to ``ANSWER_TOKENS`` tokens decoded greedily after the prompt, stopping at end of generation."""
    vocab = llama_cpp.llama_model_get_vocab(model.model)
    tokens: list[int] = []
    logits = last_logits
    while len(tokens) < ANSWER_TOKENS:
        token = int(np.argmax(logits[-1]))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        tokens.append(token)
        logits = model.logits([token], start=model.n_tokens)
    return model.detokenize(tokens).decode("utf-8", "replace")


def check_context(path: Path, ctx: int) -> None:
    """``ctx`` must be at least ``MIN_CTX`` and within the model's training context."""
    if ctx < MIN_CTX:
        raise GatenormError(f"--ctx {ctx} is too small for a pass-key prompt (at least {MIN_CTX})")
    check_training_context(GGUFFile(path), ctx, "--ctx")


def passkey(
    model_path: Path | str,
    ctx: int,
    trials: int = 10,
    *,
    seed: int = 0,
    flash_attn: bool = True,
    n_threads: int | None = None,
    cache_type: str = DEFAULT_CACHE_TYPE,
    progress: bool = False,
) -> PasskeyResult:
    """Pass-key accuracy of the GGUF at ``model_path`` with prompts of about ``ctx`` tokens."""
    model_path = Path(model_path)
    if trials < 1:
        raise GatenormError(f"--trials must be at least 1, got {trials}")
    check_context(model_path, ctx)
    chooser = random.Random(seed)
    keys = [str(chooser.randint(10_000, 99_999)) for _ in range(trials)]
    started = time.perf_counter()
    loaded = open_model(model_path, n_ctx=ctx, flash_attn=flash_attn, n_threads=n_threads, cache_type=cache_type)
    with contextlib.closing(loaded) as model:
        parts = PromptParts.for_model(model, ctx)
        result = PasskeyResult(str(model_path), ctx, flash_attn, 0, 0.0, cache_type=cache_type)
        with progress_bar(f"passkey {model_path.name}, ctx {ctx}", trials, progress) as tick:
            for position in POSITIONS:
                chosen = [i for i in range(trials) if POSITIONS[i % len(POSITIONS)] == position]
                if not chosen:
                    continue
                prefix = parts.prefix(position)
                model.clear()
                model.logits(prefix)
                for i in chosen:
                    model.keep_prefix(len(prefix))
                    rest = parts.suffix(model, position, keys[i])
                    answer = greedy_answer(model, model.logits(rest, start=len(prefix)))
                    found = DIGITS.search(answer)
                    result.prompt_tokens = max(result.prompt_tokens, len(prefix) + len(rest))
                    result.details.append(
                        PasskeyTrial(position, len(prefix), keys[i], answer, found is not None and found.group() == keys[i])
                    )
                    tick(status=f"{sum(t.correct for t in result.details)}/{len(result.details)} right")
    result.seconds = time.perf_counter() - started
    return result
