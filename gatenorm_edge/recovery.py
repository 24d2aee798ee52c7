"""Recovery for removed attention: deci "linear attention" stand-ins instead of dropping the sublayer.

Three modes for a layer whose softmax attention is removed (``prune --mode``):

- ``drop``: nothing replaces it (attention-free layer, head_count 0).
- ``fold-vo``: ``attn_output := alpha * W_O @ W_V`` with V heads repeated for grouped-query attention,
  the value path as if every token attended only to itself (HARP-style rescaling by ``alpha``, 1.0
  data-free or chosen by a small perplexity search on a text).
- ``linear``: ``attn_output := W`` fitted by ridge least squares so that ``W @ attn_norm(x)`` matches
  the removed attention's output over calibration tokens (LinearPatch-style). Layers are fitted in
  order on hidden states of the NumPy reference forward pass, each on the stream that the layers
  already replaced produce, so a fit sees the inputs it will get.

Both produce an n_embd x n_embd matrix that ``rewrite.prune_gguf`` writes as the layer's
``attn_output``; llama.cpp computes ``x + attn_output @ attn_norm(x)`` there, with no KV cache.
A V bias (qwen2) would add the constant ``W_O @ b_v``; stock llama.cpp applies no bias on this path,
so it is left out (as ``drop`` leaves out the whole sublayer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GatenormError
from .options import AUTO, DEFAULT_CALIB_CTX, DEFAULT_CALIB_TOKENS, DEFAULT_RIDGE, MODES
from .fileio import work_folder
from .harness.model import open_model
from .harness.perplexity import count_chunks, perplexity
from .progress import progress_bar
from .harness.selfcal import text_calibration
from .harness.text import read_text
from .reference import ReferenceModel, rms_norm
from .rewrite import PruneResult, check_output_path, prune_gguf
from .rewrite_plan import LinearMaps, plan_rewrite
from .sources.geometry import ModelGeometry
from .sources.gguf_file import GGUFFile

ALPHA_GRID = (0.25, 0.5, 0.75, 1.0, 1.25)
ALPHA_SEARCH_CTX = 256
ALPHA_SEARCH_CHUNKS = 4


@dataclass
class LayerFit:
    """How well a layer's linear attention reproduces the removed attention on the calibration tokens.

    Residuals are relative: sum of squared errors over the sum of squared attention outputs, so
    dropping the sublayer scores 1.0 and a perfect stand-in 0.0.
    """

    layer: int
    residual: float
    residual_fold_vo: float


@dataclass
class RecoveryReport:
    """What ``prune_with_recovery`` chose and measured, besides the rewrite itself."""

    mode: str
    alpha: float | None = None
    alpha_search: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    fits: list[LayerFit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# fold-vo


def fold_vo_matrix(model: GGUFFile, layer: int) -> np.ndarray:
    """``W_O @ W_V`` (float64, n_embd x n_embd) with each KV head's V rows repeated for its query heads."""
    w_v = model.tensor(f"blk.{layer}.attn_v.weight").astype(np.float64)
    w_o = model.tensor(f"blk.{layer}.attn_output.weight").astype(np.float64)
    n_embd = w_o.shape[0]
    n_heads_dim = w_o.shape[1]
    kv_dim = w_v.shape[0]
    n_heads = ModelGeometry.from_gguf(model).head_count[layer]
    head_dim = n_heads_dim // n_heads
    n_kv = kv_dim // head_dim
    if n_kv == 0 or n_heads % n_kv or w_v.shape[1] != n_embd:
        raise GatenormError(f"blk.{layer}: V {w_v.shape} and O {w_o.shape} do not fit {n_heads} heads of size {head_dim}")
    expanded = np.repeat(w_v.reshape(n_kv, head_dim, n_embd), n_heads // n_kv, axis=0).reshape(n_heads_dim, n_embd)
    return w_o @ expanded


def fold_vo_maps(src: Path, alpha: float) -> LinearMaps:
    """Per-layer ``alpha * W_O @ W_V``, computed from ``src`` when the rewrite asks for each layer."""
    model = GGUFFile(src)
    return lambda layer: alpha * fold_vo_matrix(model, layer)


# --------------------------------------------------------------------------------------------
# linear (least squares on calibration tokens)


def calibration_sequences(model_path: Path, text: Path, n_tokens: int, seq_len: int) -> list[np.ndarray]:
    """``n_tokens`` tokens of ``text`` in sequences of ``seq_len``, each starting with BOS as perplexity chunks do."""
    with contextlib.closing(open_model(model_path, n_ctx=seq_len)) as model:
        return text_calibration(model, text, read_text(text), seq_len, max(1, n_tokens // seq_len)).arrays()


def ridge_solve(gram: np.ndarray, cross: np.ndarray, ridge: float) -> np.ndarray:
    """W (out x in) minimising ||X W^T - Y||^2 + lam ||W||^2, from X^T X and X^T Y; lam = ridge * mean(diag X^T X)."""
    lam = ridge * float(np.trace(gram)) / gram.shape[0]
    return np.linalg.solve(gram + lam * np.eye(gram.shape[0]), cross).T


def relative_residual(normed: list[np.ndarray], targets: list[np.ndarray], matrix: np.ndarray) -> float:
    """sum ||Y - X W^T||^2 / sum ||Y||^2 over the calibration sequences."""
    error = sum(float(np.sum((y - x @ matrix.T) ** 2)) for x, y in zip(normed, targets))
    return error / sum(float(np.sum(y * y)) for y in targets)


def fit_linear_maps(
    reference: ReferenceModel,
    layers: Sequence[int],
    sequences: Sequence[np.ndarray],
    ridge: float = DEFAULT_RIDGE,
    progress: bool = False,
) -> tuple[dict[int, np.ndarray], list[LayerFit]]:
    """Fit each layer's linear attention in layer order, all sequences advancing together.

    At a fitted layer the targets are the true attention outputs on the stream the earlier stand-ins
    produce; once fitted, the stand-in's output is what flows on. Memory: one residual stream per
    sequence and the n_embd x n_embd matrices.
    """
    args = reference.args
    wanted = sorted(set(int(layer) for layer in layers))
    states = [reference.embed(sequence) for sequence in sequences]
    streams = [x for x, _ in states]
    maps: dict[int, np.ndarray] = {}
    fits: list[LayerFit] = []
    with progress_bar("fitting linear attention", wanted[-1] + 1, progress) as tick:
        for layer in range(wanted[-1] + 1):
            if layer in wanted:
                norm = reference.weight(f"blk.{layer}.attn_norm.weight")
                normed = [rms_norm(x, norm, args.norm_eps) for x in streams]
                targets = [reference.attention(n, layer, angles) for n, (_, angles) in zip(normed, states)]
                gram = sum(n.T @ n for n in normed)
                cross = sum(n.T @ y for n, y in zip(normed, targets))
                maps[layer] = ridge_solve(gram, cross, ridge)
                fits.append(LayerFit(
                    layer,
                    relative_residual(normed, targets, maps[layer]),
                    relative_residual(normed, targets, fold_vo_matrix(reference.model, layer)),
                ))
                streams = [x + n @ maps[layer].T for x, n in zip(streams, normed)]
            elif args.n_heads[layer] > 0:
                streams = [x + reference.attention_sublayer(x, layer, angles) for x, (_, angles) in zip(streams, states)]
            streams = [reference.ffn_sublayer(x, layer) for x in streams]
            tick(status=f"layer {layer}")
    return maps, fits


# --------------------------------------------------------------------------------------------
# alpha search for fold-vo


def check_search_text(model_path: Path, text: Path, ctx: int = ALPHA_SEARCH_CTX) -> None:
    """Fail early, in one line, when ``text`` is too short for the alpha search's perplexity."""
    with contextlib.closing(open_model(model_path, n_ctx=ctx)) as model:
        count_chunks(len(model.tokenize_text(read_text(text))), ctx, ALPHA_SEARCH_CHUNKS)


def search_alpha(
    src: Path, dst_dir: Path, layers: Sequence[int], text: Path, n_threads: int | None = None, progress: bool = False
) -> tuple[float, dict[str, float]]:
    """The alpha in ``ALPHA_GRID`` with the lowest fold-vo perplexity on ``text`` (ctx 256, 4 chunks)."""
    check_search_text(src, text)
    results: dict[str, float] = {}
    with work_folder("alpha-search", parent=dst_dir) as work:
        with progress_bar("alpha search", len(ALPHA_GRID), progress) as tick:
            for alpha in ALPHA_GRID:
                candidate = work / f"alpha{alpha}.gguf"
                prune_gguf(src, candidate, layers, linear_maps=fold_vo_maps(src, alpha))
                results[str(alpha)] = perplexity(candidate, text, ctx=ALPHA_SEARCH_CTX, chunks=ALPHA_SEARCH_CHUNKS,
                                                 n_threads=n_threads).ppl
                candidate.unlink()
                tick(status=f"alpha {alpha}: PPL {results[str(alpha)]:.3f}")
    best = min(ALPHA_GRID, key=lambda alpha: results[str(alpha)])
    return best, results


# --------------------------------------------------------------------------------------------
# the whole prune with a mode


def check_recovery_options(mode: str, alpha: float, alpha_search_text: Path | None, calib_text: Path | None) -> None:
    """Refuse an unknown mode, or options that belong to another mode, before any work is done."""
    if mode not in MODES:
        raise GatenormError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not np.isfinite(alpha):
        raise GatenormError(f"--alpha must be a finite number, not {alpha}")
    if mode != "fold-vo" and (alpha != 1.0 or alpha_search_text is not None):
        raise GatenormError("--alpha and --alpha-search apply to --mode fold-vo only")
    if mode not in ("linear", AUTO) and calib_text is not None:
        raise GatenormError("--calib applies to --mode auto and --mode linear only")
    if mode == "linear" and calib_text is None:
        raise GatenormError("--mode linear needs --calib TEXT (calibration text, not the evaluation text)")


def prune_with_recovery(
    src: Path,
    dst: Path,
    layers: Sequence[int],
    mode: str = "drop",
    *,
    alpha: float = 1.0,
    alpha_search_text: Path | None = None,
    calib_text: Path | None = None,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    calib_ctx: int = DEFAULT_CALIB_CTX,
    ridge: float = DEFAULT_RIDGE,
    force: bool = False,
    provenance: dict[str, str] | None = None,
    n_threads: int | None = None,
    progress: bool = False,
) -> tuple[PruneResult, RecoveryReport]:
    """``prune_gguf`` with the removed attention of ``layers`` dropped, folded (fold-vo) or fitted (linear)."""
    src, dst = Path(src), Path(dst)
    check_recovery_options(mode, alpha, alpha_search_text, calib_text)
    if mode == AUTO:
        raise GatenormError("--mode auto is the self-calibrated pipeline (selfprune.self_prune), not a fixed recovery")
    provenance = dict(provenance or {}, mode=mode)
    report = RecoveryReport(mode=mode)
    if mode == "drop":
        return prune_gguf(src, dst, layers, force=force, provenance=provenance, progress=progress), report
    if not src.is_file():
        raise GatenormError(f"{src}: no such file")
    # Validate the request and the output path before any expensive fitting or searching.
    check_output_path(src, dst, force)
    plan_rewrite(src, layers, provenance, linear=layers)
    if mode == "fold-vo":
        if alpha_search_text is not None:
            alpha, report.alpha_search = search_alpha(
                src, dst.resolve().parent, layers, alpha_search_text, n_threads, progress)
            provenance["alpha_search"] = f"{alpha_search_text.name}, ctx {ALPHA_SEARCH_CTX}, {ALPHA_SEARCH_CHUNKS} chunks"
        report.alpha = alpha
        provenance["alpha"] = repr(alpha)
        maps = fold_vo_maps(src, alpha)
    else:
        if calib_tokens < 1 or calib_ctx < 2 or ridge < 0:
            raise GatenormError("--calib-tokens and --calib-ctx must be positive and --ridge at least 0")
        sequences = calibration_sequences(src, calib_text, calib_tokens, calib_ctx)
        fitted, report.fits = fit_linear_maps(ReferenceModel.from_gguf(src), layers, sequences, ridge, progress)
        tokens = sum(len(s) for s in sequences)
        report.calibration = {"text": str(calib_text), "tokens": tokens, "ctx": calib_ctx, "ridge": ridge}
        provenance["calibration"] = f"{calib_text.name}, {tokens} tokens, ctx {calib_ctx}, ridge {ridge}"
        maps = fitted.__getitem__
    result = prune_gguf(src, dst, layers, force=force, provenance=provenance, progress=progress, linear_maps=maps)
    return result, report
