"""Linear patches for removed attention sublayers, fitted on the residual stream the model itself produces.

A patch W replaces layer L's attention with x + W·attn_norm(x) (deci's linear-attention slot). Its least-squares
statistics are gathered per layer while llama.cpp decodes (fit and held-out sequences apart), a ridge is chosen on
the held-out ones, and the fitted patches are cached by the model's sha256 and the calibration's digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import GatenormError
from .fileio import cache_folder, file_sha256
from .harness.probe import StreamEdits, StreamProbe, last_only
from .harness.selfcal import Calibration
from .progress import Ticker
from .recovery import ridge_solve

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HELD_OUT = (2, 6, 9, 13)  # of 16 sequences, those kept for validation: other start texts than the fit part


@dataclass
class LeastSquares:
    """Sufficient statistics of Y ~ X W^T (X: normed inputs, Y: attention outputs): X^T X, X^T Y, sum |Y|^2."""

    gram: np.ndarray
    cross: np.ndarray
    target_energy: float = 0.0
    tokens: int = 0

    @classmethod
    def empty(cls, width: int) -> LeastSquares:
        return cls(np.zeros((width, width)), np.zeros((width, width)))

    def add(self, normed: np.ndarray, attention: np.ndarray) -> None:
        self.gram += normed.T @ normed
        self.cross += normed.T @ attention
        self.target_energy += float(np.sum(np.square(attention, dtype=np.float64)))
        self.tokens += len(normed)

    def relative_error(self, matrix: np.ndarray) -> float:
        """sum |Y - X W^T|^2 / sum |Y|^2 from the statistics alone (1.0 for W = 0, a plain drop)."""
        error = self.target_energy - 2.0 * float(np.sum(self.cross.T * matrix)) + float(np.sum((matrix @ self.gram) * matrix))
        return error / self.target_energy


def split_sequences(n_sequences: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) sequence indices; of 16, the held-out are ``HELD_OUT``, else every 4th from 2."""
    held = list(HELD_OUT) if n_sequences == 16 else list(range(2, n_sequences, 4))
    if not held or len(held) == n_sequences:
        raise GatenormError(f"calibration needs at least 3 sequences to keep some apart for validation, not {n_sequences}")
    return [i for i in range(n_sequences) if i not in held], held


class StreamStatistics:
    """Per layer, least-squares statistics of its attention output against its normed input (``fit`` and ``held``
    out apart, by sequence), and the summed 1 - cos(x, x + attention) of every token (the ``cosine`` criterion)."""

    def __init__(self, layers: Sequence[int], width: int, held: Sequence[int]) -> None:
        self.fit = {layer: LeastSquares.empty(width) for layer in layers}
        self.held = {layer: LeastSquares.empty(width) for layer in layers}
        self.turn = dict.fromkeys(layers, 0.0)
        self.tokens = 0
        self.held_ids = np.asarray(sorted(held))
        self.captured: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []

    def edits(self, upstream: StreamEdits = StreamEdits()) -> StreamEdits:
        """``upstream``'s drops and patches, plus the capture of every layer here (kept until ``add``)."""
        return dataclasses.replace(upstream, capture=frozenset(self.fit), on_capture=lambda *arrays: self.captured.append(arrays))

    def add(self, sequences: np.ndarray, real: np.ndarray) -> None:
        """Fold in what the last decode captured: its rows' sequence indices, and which rows are real tokens.

        The arithmetic waits until llama.cpp has finished the decode: inside its callback, NumPy would compete
        with llama.cpp's own threads for the cores."""
        held = np.isin(sequences, self.held_ids)
        for rows, stats in ((real & ~held, self.fit), (real & held, self.held)):
            if rows.any():
                for layer, _x, normed, attention in self.captured:
                    stats[layer].add(normed[rows], attention[rows])
        for layer, x, _normed, attention in self.captured:
            moved = x[real] + attention[real]
            cos = np.sum(x[real] * moved, axis=1) / (np.linalg.norm(x[real], axis=1) * np.linalg.norm(moved, axis=1))
            self.turn[layer] += float(np.sum(1.0 - cos))
        self.tokens += int(real.sum())
        self.captured.clear()

    def cosine(self) -> dict[int, float]:
        """Each layer's mean 1 - cos(x, x + attention) over every token."""
        return {layer: turn / self.tokens for layer, turn in self.turn.items()}


def capture_statistics(
    probe: StreamProbe, sequences: Sequence[np.ndarray], layers: Sequence[int], held: Sequence[int], width: int,
    tick: Ticker, upstream: StreamEdits = StreamEdits(),
) -> StreamStatistics:
    """``StreamStatistics`` of ``layers`` from one pass over ``sequences``, with the drops and patches of ``upstream``
    applied to the stream (at layers before the captured ones)."""
    stats = StreamStatistics(layers, width, held)
    edits = stats.edits(upstream)
    for index, sequence in enumerate(sequences):
        probe.run([sequence], edits, lambda _index, _logits: None, last_only)
        stats.add(np.full(len(sequence), index), np.ones(len(sequence), dtype=bool))
        tick(status=f"sequence {index + 1}")
    return stats


def best_patch(fit: LeastSquares, held: LeastSquares) -> tuple[float, float, np.ndarray]:
    """(ridge, held-out relative error, W) of the ridge in ``RIDGES`` with the smallest held-out error."""
    best: tuple[float, float, np.ndarray] | None = None
    for ridge in RIDGES:
        matrix = ridge_solve(fit.gram, fit.cross, ridge)
        error = held.relative_error(matrix)
        if best is None or error < best[1]:
            best = (ridge, error, matrix)
    assert best is not None
    return best


FITS_VERSION = 1  # bump when the capture, the split or RIDGES change: part of the fits' cache key


def fits_path(model: Path, calibration: Calibration) -> Path:
    """Where the patches fitted on ``calibration`` are kept: by the model's sha256 and the calibration's digest."""
    key = json.dumps([file_sha256(model), calibration.sha256, calibration.tokens, len(calibration.sequences), RIDGES,
                      FITS_VERSION])
    return cache_folder("fits") / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def recovered_edits(layers: Sequence[int], patches: dict[int, np.ndarray]) -> StreamEdits:
    """Edits for ``layers`` removed, each patched where ``patches`` has it, dropped otherwise."""
    return StreamEdits(
        drop=frozenset(layer for layer in layers if layer not in patches),
        patch={layer: patches[layer].astype(np.float32) for layer in layers if layer in patches},
    )
