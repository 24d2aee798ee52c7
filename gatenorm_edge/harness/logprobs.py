"""Log-probabilities from llama.cpp logits, and the standard error of a mean: one home for both.

Logits are turned into float64 a block of rows at a time, so a 49k-vocabulary chunk of 512 rows costs a
few MB of float64 work, not 200 MB.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

ROWS_PER_BLOCK = 32  # rows of logits turned into float64 at a time


def row_blocks(n_rows: int) -> Iterator[slice]:
    for low in range(0, n_rows, ROWS_PER_BLOCK):
        yield slice(low, min(low + ROWS_PER_BLOCK, n_rows))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64."""
    values = logits.astype(np.float64)
    peak = values.max(axis=-1, keepdims=True)
    return values - peak - np.log(np.exp(values - peak).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target token under its row of logits (float64)."""
    nll = np.empty(len(targets), dtype=np.float64)
    for rows in row_blocks(len(targets)):
        log_probs = log_softmax(logits[rows])
        nll[rows] = -log_probs[np.arange(log_probs.shape[0]), targets[rows]]
    return nll


def stderr_of_mean(values: Sequence[float] | np.ndarray) -> float | None:
    """Standard error of the mean, as lm-eval reports it: sample standard deviation (n - 1) over sqrt(n);
    None (undefined) below two values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return None
    return float(values.std() / math.sqrt(values.size - 1))
