"""The prompts a model's own calibration text is sampled from, by source (``prune --calib-source``):

- ``bos``: the beginning-of-text token alone (Williams, Chrysostomou and Aletras, NAACL 2025);
- ``starts``: the first words of many kinds of text (``STARTS``: prose, dialogue, a letter, a recipe, an
  encyclopedia heading, a list, a little code and mathematics);
- ``chat``: requests for many kinds of text (``REQUESTS`` x ``TOPICS``: an encyclopedia article, a news report,
  a story, a letter, a dialogue, a how-to, an explanation of a science topic, a little code) sent through the
  model's own chat template, so an instruct model answers as it was tuned to;
- ``mix``: the three in turn.

Prompts are token lists; every sequence starts with BOS where the vocab adds one (a chat template writes its
own). A model without a chat template gets ``bos`` and ``starts`` for ``mix``, and ``chat`` is refused.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp

from ..errors import GatenormError
from ..options import CALIB_SOURCES as SOURCES
from .model import LoadedModel

PROMPTS_VERSION = 3  # bump when STARTS, REQUESTS, TOPICS or how prompts are made change: part of the cache key

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

REQUESTS = (
    "Write an encyclopedia article about {topic}.",
    "Write a news report about {topic}.",
    "Tell a short story about {topic}.",
    "Write a letter to a friend about {topic}.",
    "Write a dialogue between two people who disagree about {topic}.",
    "Explain step by step how to get started with {topic}.",
    "Explain the science behind {topic} to a curious student.",
    "Write a short Python program that has something to do with {topic}, and explain it.",
)

TOPICS = (
    "the history of a small river town", "honeybees", "the invention of the printing press", "a local election",
    "volcanoes", "learning to play the violin", "a lost dog that finds its way home", "winter in the mountains",
    "the moon landing", "baking bread", "a new train line", "tides and the moon", "an old lighthouse",
    "saving money", "the human heart", "a football match",
)


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one source, and what the source ended up being (``mix`` without a template says so)."""

    prompts: tuple[tuple[int, ...], ...]
    source: str
    note: str | None = None  # a line for the user when the source had to change


def chat_template(model: LoadedModel) -> str | None:
    """The model's own chat template (GGUF ``tokenizer.chat_template``), None when it has none."""
    raw = llama_cpp.llama_model_chat_template(model.model, None)
    return raw.decode("utf-8") if raw else None


def chat_prompt(model: LoadedModel, template: str, request: str) -> list[int]:
    """``request`` as the user's message, rendered by llama.cpp's template engine, ready for the answer."""
    message = llama_cpp.llama_chat_message(role=b"user", content=request.encode("utf-8"))
    messages = (llama_cpp.llama_chat_message * 1)(message)
    size = 4 * len(request) + 1024
    for _ in range(2):
        buffer = ctypes.create_string_buffer(size)
        written = llama_cpp.llama_chat_apply_template(template.encode("utf-8"), messages, 1, True, buffer, size)
        if written < 0:
            raise GatenormError(f"{model.path}: llama.cpp does not know this model's chat template")
        if written <= size:
            text = buffer.raw[:written].decode("utf-8")
            return model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        size = written + 1
    raise GatenormError(f"{model.path}: the chat template's output did not fit")


def requests(count: int) -> list[str]:
    """``count`` requests, every kind in turn, each with its own topic."""
    return [REQUESTS[i % len(REQUESTS)].format(topic=TOPICS[(i // len(REQUESTS) + i) % len(TOPICS)]) for i in range(count)]


def prompt_set(model: LoadedModel, source: str, count: int, lead: list[int], boundary: int) -> PromptSet:
    """``count`` prompts of ``source``: ``lead`` (BOS, where the vocab adds one) before plain-text prompts, and
    ``boundary`` (BOS, else end-of-text) as the whole prompt of ``bos``."""
    if source not in SOURCES:
        raise GatenormError(f"--calib-source is one of {', '.join(SOURCES)}, not {source!r}")
    template = chat_template(model)
    note = None
    kinds = {"mix": ("bos", "starts", "chat"), "bos": ("bos",), "starts": ("starts",), "chat": ("chat",)}[source]
    if "chat" in kinds and template is None:
        if source == "chat":
            raise GatenormError(f"{model.path}: the model has no chat template; use --calib-source bos, starts or mix")
        kinds = ("bos", "starts")
        note = f"{model.path.name} has no chat template: its calibration text is sampled from BOS and start texts only"
    asks = requests(count)
    prompts = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        if kind == "bos":
            prompts.append(tuple(lead or [boundary]))
        elif kind == "starts":
            start = STARTS[(i // len(kinds)) % len(STARTS)]
            prompts.append(tuple(lead + model.tokenize(start.encode("utf-8"), add_bos=False, special=False)))
        else:
            prompts.append(tuple(chat_prompt(model, template, asks[i // len(kinds)])))
    return PromptSet(tuple(prompts), "+".join(kinds) if source == "mix" else source, note)
