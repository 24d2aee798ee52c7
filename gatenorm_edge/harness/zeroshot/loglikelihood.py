"""Log-likelihood of each choice of an example, with the tokens all choices share decoded once.

The token boundary is lm-eval's: trailing whitespace of the context moves onto the continuation,
``context`` and ``context + continuation`` are tokenized (BOS added when the vocab adds one) and the
continuation's tokens are the tail of the second beyond the length of the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import GatenormError
from ..logprobs import token_nll
from ..model import LoadedModel
from .tasks import Example

def encode_pair(tokenize: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's token boundary: (context tokens, continuation tokens = tail of the joint tokenization)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenize(context + continuation)
    context_tokens = tokenize(context)
    continuation_tokens = whole[len(context_tokens) :]
    if not context_tokens or not continuation_tokens:
        raise GatenormError(f"cannot score {continuation!r} after {context[-40:]!r}: an empty side after tokenization")
    return context_tokens, continuation_tokens


@dataclass(frozen=True)
class ChoiceTokens:
    """One choice as the model reads it: ``tokens`` (context then continuation), continuation from ``start``."""

    tokens: tuple[int, ...]
    start: int


def tokenize_example(model: LoadedModel, example: Example) -> list[ChoiceTokens]:
    """Each choice's tokens; an error when one would not fit in the model's context."""
    choices = []
    for context, continuation in example.requests:
        context_tokens, continuation_tokens = encode_pair(model.tokenize_text, context, continuation)
        tokens = tuple(context_tokens + continuation_tokens)
        if len(tokens) > model.n_ctx():
            raise GatenormError(f"example {example.index} needs {len(tokens)} tokens, over the context of {model.n_ctx()}")
        choices.append(ChoiceTokens(tokens, len(context_tokens)))
    return choices


def shared_prefix(choices: Sequence[ChoiceTokens]) -> int:
    """How many leading tokens every choice has in common, leaving each at least its last token."""
    limit = min(len(choice.tokens) for choice in choices) - 1
    first = choices[0].tokens
    length = 0
    while length < limit and all(choice.tokens[length] == first[length] for choice in choices):
        length += 1
    return length


def choice_loglikelihoods(model: LoadedModel, choices: Sequence[ChoiceTokens], *, reuse: bool = True) -> list[float]:
    """Summed log-likelihood of each choice's continuation.

    With ``reuse`` the prefix all choices share is decoded once and kept in the KV cache while each choice
    decodes only its own tokens; without it every choice is decoded from an empty cache (lm-eval's way).
    The last token of a choice is never decoded: nothing reads the logits it would produce.
    """
    prefix = shared_prefix(choices) if reuse else 0
    # Rows of the prefix from the first position whose logits a continuation reads (none if it starts later).
    prefix_first = min(min(choice.start for choice in choices) - 1, prefix)
    model.clear()
    prefix_logits = np.empty((0, model.vocab_size), dtype=np.float32)
    if prefix:
        prefix_logits = model.logits(choices[0].tokens[:prefix], output_from=prefix_first)
    results = []
    for choice in choices:
        if prefix:
            model.keep_prefix(prefix)
        else:
            model.clear()
        own_first = max(choice.start - 1, prefix)
        own_logits = model.logits(choice.tokens[prefix:-1], start=prefix, output_from=own_first - prefix)
        positions = range(choice.start - 1, len(choice.tokens) - 1)
        rows = [
            prefix_logits[position - prefix_first] if position < prefix else own_logits[position - own_first]
            for position in positions
        ]
        targets = [choice.tokens[position + 1] for position in positions]
        results.append(float(-token_nll(np.stack(rows), np.asarray(targets)).sum()))
    return results


