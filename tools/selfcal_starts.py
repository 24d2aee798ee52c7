"""How much of a model's self-sampled calibration text is code: varied start texts (selfcal.STARTS) vs
sampling from the beginning-of-text token alone, 16 sequences of 256 tokens each, same seed.

A sequence counts as code when at least a third of its non-empty lines look like code (indented blocks,
braces, semicolons at line end, assignments, calls, `def`/`import`/`return`/`#include`...).

Usage: python tools/selfcal_starts.py MODEL [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path

from gatenorm_edge.harness.model import open_model
from gatenorm_edge.harness.prompts import STARTS, prompt_set
from gatenorm_edge.harness.selfcal import DEFAULT_SEED, DEFAULT_SEQ_LEN, sample_sequences, sampler_tables

CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import|return\b|#include|public |private |function\b|var |let |const |for \(|if \(|"
    r"print\(|console\.)|[;{}]\s*$|^\s{4,}\S|\w+\s*=\s*[\w\[\]{}(\"']|\w+\([^)]*\)\s*$"
)


def code_share(text: str) -> float:
    lines = [line for line in text.splitlines() if line.strip()]
    return sum(bool(CODE_LINE.search(line)) for line in lines) / max(1, len(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    with contextlib.closing(open_model(args.model, n_ctx=DEFAULT_SEQ_LEN, n_threads=args.threads)) as model:
        _, lead, boundary = sampler_tables(model)
        for label, source in (("varied starts (STARTS)", "starts"), ("beginning of text only", "bos")):
            prompts = prompt_set(model, source, len(STARTS), lead, boundary).prompts
            sequences = sample_sequences(model, prompts, DEFAULT_SEQ_LEN, DEFAULT_SEED).sequences
            texts = [model.detokenize(list(s)).decode("utf-8", "replace") for s in sequences]
            shares = [code_share(text) for text in texts]
            code = sum(share >= 1 / 3 for share in shares)
            print(f"{args.model.name}: {label}: {code} of {len(texts)} sequences are code; "
                  f"code-like lines {sum(shares) / len(shares):.0%} on average")


if __name__ == "__main__":
    main()
