"""Gate-Norm: rank attention sublayers by query-key coupling, from the weights alone, in NumPy.

With per-head blocks Q_h, K_g (head_dim x width rows, as stored) the attention logit of head h is
x^T Q_h^T K_g y, so a layer's coupling matrix is W_Q W_K^T = sum_h Q_h^T K_g(h) (width x width).

- ``full``:     ||sum_h Q_h^T K_g(h)||_F, the paper's literal score (K heads repeated for GQA);
                forms the width x width product, O(width^3).
- ``per-head``: sqrt(sum_h ||Q_h^T K_g(h)||_F^2), computed exactly from head_dim x head_dim Gram
                matrices: ||Q_h^T K_g||_F^2 = tr((Q_h Q_h^T)(K_g K_g^T)).
- ``folded``:   ``per-head`` after folding the attention RMSNorm gain into the columns of Q and K.

Every variant is unchanged by a permutation applied to the rows of each query head together with the
rows of its key head, so GGUF files (llama.cpp reorders Q/K rows for RoPE) score like HF checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from .errors import GatenormError
from .options import VARIANTS
from .progress import progress_bar
from .sources import open_source



def _heads(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """View a (heads x head_dim, width) weight as (heads, head_dim, width)."""
    return weights.reshape(n_heads, weights.shape[0] // n_heads, weights.shape[1])


# Each thread widens the float16 head it is working on into its own reused float32 buffer, so
# widening stays in cache and never page-faults a fresh allocation.
_widened = threading.local()
_SIGN_AND_FIELDS = np.uint32(0x8FFFE000).view(np.int32)
_REBIAS = np.float32(2.0**112)


def _widen_float16(half: np.ndarray, out: np.ndarray) -> None:
    """float16 -> float32 into ``out``, exact for every finite value (4x faster than astype here).

    Sign-extend the 16 bits, shift exponent and mantissa into their float32 places, keep the sign bit,
    and multiply by 2**112 to move the exponent bias from 15 to 127 (exact for subnormals too).
    Inf and NaN come out as finite values of magnitude >= 65536, which no finite float16 reaches.
    """
    ints = out.view(np.int32)
    np.copyto(ints, half.view(np.int16))
    np.left_shift(ints, 13, out=ints)
    np.bitwise_and(ints, _SIGN_AND_FIELDS, out=ints)
    np.multiply(out, _REBIAS, out=out)


def _gram(head: np.ndarray) -> np.ndarray:
    """head @ head.T (a float16 head is widened to float32 here, one head at a time)."""
    if head.dtype != np.float16:
        return head @ head.T
    rows = getattr(_widened, "rows", None)
    if rows is None or rows.shape != head.shape:
        rows = _widened.rows = np.empty(head.shape, dtype=np.float32)
    _widen_float16(head, rows)
    gram = rows @ rows.T
    if np.max(np.diagonal(gram)) >= 2.0**32:
        # A value of magnitude >= 65536 (or a huge row): redo the head with NumPy's own cast, which
        # turns Inf and NaN into Inf and NaN.
        rows = head.astype(np.float32)
        gram = rows @ rows.T
    return gram


def per_head_score(q: np.ndarray, k: np.ndarray, n_head: int, n_head_kv: int, pool: Executor | None = None) -> float:
    """sqrt(sum_h ||Q_h^T K_g(h)||_F^2) from head_dim x head_dim Gram matrices; no width x width product.

    ``pool`` computes the Gram matrices of several heads at once (NumPy releases the GIL).
    """
    each = pool.map if pool is not None else map
    group = n_head // n_head_kv
    k_grams = list(each(_gram, _heads(k, n_head_kv)))
    q_grams = each(_gram, _heads(q, n_head))
    total = sum(float(np.sum(gram_q * k_grams[h // group], dtype=np.float64)) for h, gram_q in enumerate(q_grams))
    return math.sqrt(total)


def full_score(q: np.ndarray, k: np.ndarray, n_head: int, n_head_kv: int) -> float:
    """||W_Q W_K^T||_F of the whole layer, K heads repeated for grouped-query attention."""
    k_repeated = np.repeat(_heads(k, n_head_kv), n_head // n_head_kv, axis=0).reshape(q.shape)
    coupling = q.astype(np.float32, copy=False).T @ k_repeated.astype(np.float32, copy=False)
    return float(np.linalg.norm(coupling))


def score_layer(
    q: np.ndarray,
    k: np.ndarray,
    n_head: int,
    n_head_kv: int,
    variant: str = "per-head",
    norm_gain: np.ndarray | None = None,
    pool: Executor | None = None,
) -> float:
    """One layer's score from its Q (n_head*head_dim x width) and K (n_head_kv*head_dim x width) weights."""
    if variant == "per-head":
        return per_head_score(q, k, n_head, n_head_kv, pool)
    if variant == "full":
        return full_score(q, k, n_head, n_head_kv)
    if variant == "folded":
        if norm_gain is None:
            raise ValueError("the folded variant needs the attention norm gain")
        return per_head_score(q * norm_gain, k * norm_gain, n_head, n_head_kv, pool)
    raise GatenormError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")


@dataclass(frozen=True)
class LayerScore:
    layer: int
    score: float


@dataclass(frozen=True)
class ScoreReport:
    """Scores of every layer and the suggested prune order; ``to_dict`` is the JSON contract."""

    model: str
    architecture: str
    n_layers: int
    variant: str
    seconds: float
    layers: list[LayerScore]
    prune_order: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "score report") -> ScoreReport:
        """Validate a decoded JSON report; every problem becomes a one-line GatenormError."""

        def bad(problem: str) -> GatenormError:
            return GatenormError(f"{where}: not a valid score report ({problem})")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return (is_int(value) or isinstance(value, float)) and math.isfinite(value)

        if not isinstance(data, dict):
            raise bad("not a JSON object")
        missing = [key for key in ("model", "architecture", "n_layers", "variant", "seconds", "layers", "prune_order") if key not in data]
        if missing:
            raise bad(f"missing {', '.join(missing)}")
        if not isinstance(data["model"], str) or not isinstance(data["architecture"], str):
            raise bad("model and architecture must be strings")
        n_layers = data["n_layers"]
        if not is_int(n_layers) or n_layers <= 0:
            raise bad("n_layers must be a positive integer")
        if data["variant"] not in VARIANTS:
            raise bad(f"variant must be one of {', '.join(VARIANTS)}")
        if not is_number(data["seconds"]) or data["seconds"] < 0:
            raise bad("seconds must be a non-negative number")
        layers = data["layers"]
        if not isinstance(layers, list) or not all(
            isinstance(e, dict) and is_int(e.get("layer")) and is_number(e.get("score")) and e["score"] >= 0 for e in layers
        ):
            raise bad("layers must be a list of {layer: int, score: non-negative number}")
        if [e["layer"] for e in layers] != list(range(n_layers)):
            raise bad(f"layers must list layers 0..{n_layers - 1} once each, in order")
        order = data["prune_order"]
        if not isinstance(order, list) or not all(is_int(i) and 1 <= i < n_layers for i in order) or len(set(order)) != len(order):
            raise bad(f"prune_order must list distinct layers from 1 to {n_layers - 1}")
        return cls(
            model=data["model"],
            architecture=data["architecture"],
            n_layers=n_layers,
            variant=data["variant"],
            seconds=float(data["seconds"]),
            layers=[LayerScore(e["layer"], float(e["score"])) for e in layers],
            prune_order=list(order),
        )

    @classmethod
    def from_json(cls, path: Path | str) -> ScoreReport:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise GatenormError(f"{path}: no such file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GatenormError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))


def prune_order(scores: Sequence[float | None]) -> list[int]:
    """Layers 1..n-1 from the lowest score to the highest, ties by index (layer 0 is never listed; a
    criterion leaves it None)."""
    return sorted(range(1, len(scores)), key=lambda layer: (scores[layer], layer))


def score_model(path: Path | str, variant: str = "per-head", progress: bool = False) -> ScoreReport:
    """Score every attention sublayer of a GGUF file or HF safetensors checkpoint, one layer in memory at a time."""
    if variant not in VARIANTS:
        raise GatenormError(f"unknown variant {variant!r} (choose from {', '.join(VARIANTS)})")
    start = time.perf_counter()
    source = open_source(path)
    geometry = source.geometry
    scores = []
    # Per-head work is many small matrix products: run them side by side on our threads, each
    # single-threaded in BLAS (BLAS threads inside a small product are slower, and spin badly when the
    # cores are busy). ``full`` is one large product per layer: BLAS keeps its own threads.
    blas_threads = None if variant == "full" else 1
    bar = progress_bar(f"scoring ({variant})", geometry.n_layers, progress)
    with threadpool_limits(limits=blas_threads, user_api="blas"), ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool, bar as tick:
        for layer in range(geometry.n_layers):
            attention = source.attention(layer, with_norm_gain=variant == "folded")
            scores.append(
                score_layer(attention.q, attention.k, source.n_head, source.n_head_kv, variant, attention.norm_gain, pool)
            )
            tick()
    return ScoreReport(
        model=str(path),
        architecture=source.architecture.name,
        n_layers=geometry.n_layers,
        variant=variant,
        seconds=time.perf_counter() - start,
        layers=[LayerScore(layer, score) for layer, score in enumerate(scores)],
        prune_order=prune_order(scores),
    )
