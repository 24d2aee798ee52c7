"""The data-free default of ``prune --count K``: choose layers and recover them on the model's own samples.

Five stages, all in llama.cpp on the model's own quantized weights (``harness.probe`` edits the residual
stream during a decode, so no candidate file is ever written):

1. **calibrate**: sample sequences from the model itself from varied starts (``harness.selfcal``), or
   cut them from ``--calib FILE``. The sequences are split into a *fit* part and a *held-out* part with
   other start texts, so anything fitted must carry over to kinds of text it was not fitted on.
2. **capture**: one pass over every sequence records, per layer, the least-squares statistics of its
   attention output against its normed input (fit and held-out apart), and how much it turns the
   residual stream (1 - cos(x, x + attention(x)), the ``cosine`` criterion).
3. **patch**: per layer, a ridge linear patch W (x + W·attn_norm(x), deci linear attention) is fitted
   on the fit part for each ridge of ``patches.RIDGES``; the ridge with the smallest held-out error wins, and the
   patch is kept only where that error is below a plain drop's (relative error 1). Else the layer is dropped.
4. **choose**: walk the cosine order; the first K + ``SHORTLIST_EXTRA`` layers are each dropped alone and
   scored by KL divergence from the base model on held-out tokens; any layer, then or later in the walk,
   whose KLD exceeds ``VETO_FACTOR`` times the shortlist's median is vetoed (a critical layer: the study's
   finding). The first K that pass are removed.
5. **guard**: the K layers together, patched as chosen, against all of them dropped, on the same held-out
   tokens: the patches stay only if they beat the plain drop there. The same is done for per-head
   Gate-Norm's K layers (the old default), and the set with the lower held-out KLD is written.

Measured against the alternatives in docs/study.md ("The data-free default").
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GatenormError
from .options import DEFAULT_CACHE_TYPE
from .patches import StreamStatistics, best_patch, capture_statistics, fits_path, recovered_edits, split_sequences
from .speedmodel import Change
from .harness.model import LoadedModel, open_model
from .harness.probe import HeldOutDivergence, StreamProbe
from .progress import progress_bar
from .harness.selfcal import Calibration, CalibrationRecord, CalibrationSpec, Capture, self_calibration, text_calibration
from .harness.text import read_text
from .rewrite import PruneResult, check_output_path, prune_gguf
from .rewrite_plan import as_written, attn_output_type, linear_tensor_type, plan_rewrite
from .cache import read_arrays, write_arrays
from .scoring import score_model
from .sources.geometry import gguf_geometry
from .sources.gguf_file import GGUFFile

KLD_SEQUENCES = 2  # held-out sequences scored for KLD, in full; their second half is scored, as perplexity does
SHORTLIST_EXTRA = 3
VETO_FACTOR = 3.0
STAGES = 5
SELF_CALIBRATED_ARCHS = ("llama", "qwen2")  # whose llama.cpp graphs name attn_norm-L, ffn_inp-L and l_out-L


@dataclass
class LayerChoice:
    """What the pipeline measured for one prunable layer."""

    layer: int
    cosine: float
    per_head: float
    ridge: float | None = None
    held_error: float = 1.0  # relative error of the best patch on held-out tokens (1.0: no better than a drop)
    kld: float | None = None  # single-layer KLD on held-out tokens, the layer dropped (None: not tried)


@dataclass
class Candidate:
    """One layer set the guard weighed: its KLDs on held-out tokens, all dropped and as patched."""

    name: str
    layers: list[int]
    patched: list[int]
    kld_dropped: float
    kld_patched: float | None
    kld: float  # of the form kept (patched only where that beat dropping all)


@dataclass
class SelfPruneReport:
    """The pipeline's decisions and measurements, for the JSON and the gatenorm.* metadata."""

    count: int
    layers: list[int]
    patched: list[int]
    calibration: CalibrationRecord
    per_layer: list[LayerChoice]
    shortlist: list[int]
    vetoed: list[int]
    candidates: list[Candidate]
    picked: str
    seconds: dict[str, float] = field(default_factory=dict)
    patch_type: str | None = None  # the ggml type the patches are written in
    kld_float: float | None = None  # the picked set's held-out KLD with its patches in float32, not as written
    kld_sequential: float | None = None  # the same with sequentially refitted patches (as written), when tried
    predicted: dict[str, Any] | None = None  # with a budget: the prediction the plan was chosen by
    patches: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # layer -> W, for the patched layers

    def to_dict(self) -> dict[str, Any]:
        """The ``selfprune`` JSON entry (``predicted`` has its own, top-level entry; the patches are in the file)."""
        data = asdict(self) | {"calibration": self.calibration.to_dict()}
        del data["predicted"], data["patches"]
        return data

    @property
    def held_out_kld(self) -> float:
        """The held-out KLD of what is written: the picked set, with sequential patches where they won."""
        picked = min(candidate.kld for candidate in self.candidates)
        return picked if self.kld_sequential is None else min(picked, self.kld_sequential)

    def change(self, cache_type: str = DEFAULT_CACHE_TYPE) -> Change:
        dropped = tuple(layer for layer in self.layers if layer not in self.patched)
        return Change(dropped=dropped, patched=tuple(self.patched), cache_type=cache_type)

    def provenance(self) -> dict[str, str]:
        cal = self.calibration
        return {
            "selection": "self-calibrated (cosine order, single-layer KLD veto)",
            "calibration.source": cal.source,
            "calibration.sha256": cal.sha256,
            "calibration.tokens": str(cal.tokens),
            "patched_layers": ",".join(map(str, self.patched)) or "none",
            "picked": self.picked,
            "held_out_kld": f"{self.held_out_kld:.6f}",
        } | ({"predicted": json.dumps(self.predicted)} if self.predicted else {})


def check_count(count: int, n_layers: int) -> None:
    """K must leave layer 0 and one more layer with attention (llama.cpp needs both)."""
    if not 1 <= count <= n_layers - 2:
        raise GatenormError(f"--count must be between 1 and {n_layers - 2} for a {n_layers}-layer model, not {count}")


def load_calibration(
    model: LoadedModel, calib: Path | None, spec: CalibrationSpec, progress: bool, capture: Capture | None = None,
) -> Calibration:
    """Self-sampled calibration as ``spec`` says (``capture`` seeing every token as it is sampled), or as many
    sequences cut from the text file ``calib``."""
    if calib is None:
        label = f"1/{STAGES} sampling calibration text (and capturing attention)"
        return self_calibration(model, spec, progress=progress, label=label, capture=capture)
    return text_calibration(model, calib, read_text(calib), spec.seq_len, spec.sequences)


class SelfCalibratedPruner:
    """Stages 1-3 once per model (calibrate, capture, fit), then ``plan(K)`` for any number of K.

    Single-layer KLDs are remembered, so plans for several K share them (same results, less work).
    """

    def __init__(
        self, model_path: Path, *, calib: Path | None = None, spec: CalibrationSpec = CalibrationSpec(),
        recover: bool = True, sequential: bool = False, n_threads: int | None = None, progress: bool = False,
    ) -> None:
        self.progress = progress
        self.sequential = sequential
        self.seconds: dict[str, float] = {}
        started = time.perf_counter()
        self.per_head = [entry.score for entry in score_model(model_path, "per-head").layers]
        self.prunable = list(range(1, len(self.per_head)))
        self._closing = contextlib.ExitStack()
        self.model = self._closing.enter_context(
            contextlib.closing(open_model(model_path, n_ctx=spec.seq_len, n_threads=n_threads))
        )
        try:
            self._prepare(calib, spec, recover, started)
        except BaseException:
            self.close()
            raise

    def _prepare(self, calib: Path | None, spec: CalibrationSpec, recover: bool, started: float) -> None:
        width = int(self.model.n_embd())
        _, held = split_sequences(spec.sequences)
        stats = StreamStatistics(self.prunable, width, held)
        capture = Capture(stats.edits(), stats.add) if calib is None else None
        self.calibration = load_calibration(self.model, calib, spec, self.progress, capture)
        if self.calibration.cached is not False:
            with progress_bar(f"1/{STAGES} calibration text", 1, self.progress) as tick:
                tick(status=f"{self.calibration.tokens} tokens, {self.calibration.source}")
        self.seconds["calibrate"] = time.perf_counter() - started
        sequences = self.calibration.arrays()
        self.probe = self._closing.enter_context(contextlib.closing(StreamProbe(self.model, spec.seq_len)))
        fits = fits_path(self.model.path, self.calibration)
        mark = time.perf_counter()
        stored = read_arrays(fits, "patch-fit") if self.calibration.cached is not False else None
        if stored is not None:  # fitted before on this very calibration text: nothing to capture or fit
            meta, arrays = stored
            self.choices = {int(layer): LayerChoice(**choice) for layer, choice in meta.items()}
            self.patches = {layer: arrays[f"w{layer}"] for layer in self.choices if recover and f"w{layer}" in arrays}
            with progress_bar(f"2-3/{STAGES} patches fitted before", 1, self.progress) as tick:
                tick(status=f"{len(arrays)} patches from the cache")
            self.seconds["fits_from_cache"] = time.perf_counter() - mark
        else:
            self._fit(sequences, held, stats, width, recover)
            write_arrays(fits, {layer: asdict(choice) for layer, choice in self.choices.items()},
                         {f"w{layer}": matrix for layer, matrix in self.fitted.items()})
        self.patch_type = linear_tensor_type(attn_output_type(self.model.path), width)
        self.divergence = HeldOutDivergence(self.probe, [sequences[i] for i in held[:KLD_SEQUENCES]])

    def _fit(self, sequences: list[np.ndarray], held: list[int], stats: StreamStatistics, width: int, recover: bool) -> None:
        """Stages 2-3: the statistics (captured while sampling, or in one more pass), then each layer's best patch."""
        mark = time.perf_counter()
        if self.calibration.captured:
            with progress_bar(f"2/{STAGES} capturing attention", 1, self.progress) as tick:
                tick(status=f"{stats.tokens} tokens, while they were sampled")
        else:  # from the cache, a text file, or with samples dropped: one more pass
            with progress_bar(f"2/{STAGES} capturing attention", len(sequences), self.progress) as tick:
                stats = capture_statistics(self.probe, sequences, self.prunable, held, width, tick)
        turn = stats.cosine()
        self.seconds["capture"] = time.perf_counter() - mark
        mark = time.perf_counter()
        self.choices: dict[int, LayerChoice] = {}
        self.fitted: dict[int, np.ndarray] = {}  # every patch that beat a drop on held-out tokens
        with progress_bar(f"3/{STAGES} fitting patches", len(self.prunable), self.progress) as tick:
            for layer in self.prunable:
                ridge, error, matrix = best_patch(stats.fit.pop(layer), stats.held.pop(layer))
                self.choices[layer] = LayerChoice(layer, turn[layer], self.per_head[layer], ridge, error)
                if error < 1.0:
                    self.fitted[layer] = matrix.astype(np.float32)
                tick(status=f"layer {layer}: held-out error {error:.3f}")
        self.patches = dict(self.fitted) if recover else {}
        self.seconds["patch"] = time.perf_counter() - mark

    def close(self) -> None:
        self._closing.close()

    def single_kld(self, layer: int) -> float:
        """KLD on held-out tokens with ``layer``'s attention dropped (remembered)."""
        choice = self.choices[layer]
        if choice.kld is None:
            choice.kld = self.divergence(recovered_edits([layer], {}))
        return choice.kld

    def plan(self, count: int, *, fixed: Sequence[int] | None = None) -> SelfPruneReport:
        """Stages 4-5 for ``count`` layers: the report, with the patches to write (layer -> W).

        The first ``count + SHORTLIST_EXTRA`` layers of the cosine order are tried alone (dropped); a layer
        whose KLD exceeds ``VETO_FACTOR`` times their median is vetoed, and the walk goes on down the order
        until ``count`` layers pass. ``fixed`` layers (chosen elsewhere) skip the choice and are only patched.
        """
        check_count(count, len(self.per_head))
        seconds = dict(self.seconds)
        mark = time.perf_counter()
        order = sorted(self.prunable, key=lambda i: (self.choices[i].cosine, i))
        vetoed: list[int] = []
        if fixed is not None:
            shortlist = chosen = sorted(int(layer) for layer in fixed)
        else:
            shortlist = order[: count + SHORTLIST_EXTRA]
            with progress_bar(f"4/{STAGES} single-layer KLD veto", len(shortlist), self.progress) as tick:
                for layer in shortlist:
                    tick(status=f"layer {layer}: {self.single_kld(layer):.4f}")
                limit = VETO_FACTOR * float(np.median([self.single_kld(layer) for layer in shortlist]))
                chosen = []
                for layer in order:
                    if len(chosen) == count:
                        break
                    (chosen if self.single_kld(layer) <= limit else vetoed).append(layer)
                chosen += sorted(vetoed, key=self.single_kld)[: count - len(chosen)]  # only if too few passed
                chosen = sorted(chosen)
        seconds["choose"] = time.perf_counter() - mark
        mark = time.perf_counter()
        candidates = {"self-calibrated": chosen}
        gate_norm = sorted(sorted(self.prunable, key=lambda i: (self.per_head[i], i))[:count])
        if fixed is None and gate_norm != chosen:
            candidates["per-head Gate-Norm"] = gate_norm
        outcomes: list[Candidate] = []
        with progress_bar(f"5/{STAGES} guard: patches vs drop", 2 * len(candidates), self.progress) as tick:
            for name, layers in candidates.items():
                outcomes.append(self.recover(name, layers))
                tick(2, status=f"{name}: KLD {outcomes[-1].kld:.4f}")
        best = min(outcomes, key=lambda outcome: outcome.kld)
        patches = {layer: self.patches[layer] for layer in best.patched}
        kld_float = kld_sequential = None
        if best.patched and self.sequential:  # refitted in layer order; kept where that wins on held-out tokens
            refit = self.sequential_patches(best.layers, best.patched)
            kld_sequential = self.divergence(recovered_edits(best.layers, self.as_written(refit)))
            if kld_sequential < best.kld:
                patches = refit
        if best.patched:  # what writing the patches in the file's type costs, on the same held-out tokens
            kld_float = self.divergence(recovered_edits(best.layers, patches))
        seconds["guard"] = time.perf_counter() - mark
        seconds["total"] = sum(seconds.values())
        report = SelfPruneReport(
            count=count,
            layers=best.layers,
            patched=best.patched,
            calibration=self.calibration.record(),
            per_layer=[self.choices[layer] for layer in self.prunable],
            shortlist=shortlist,
            vetoed=vetoed,
            candidates=outcomes,
            picked=best.name,
            seconds=seconds,
            patch_type=self.patch_type.name if best.patched else None,
            kld_float=kld_float,
            kld_sequential=kld_sequential,
            patches=patches,
        )
        return report

    def as_written(self, patches: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """``patches`` as the file will hold them (quantized to the patch type and back)."""
        return {layer: as_written(matrix, self.patch_type) for layer, matrix in patches.items()}

    def sequential_patches(self, layers: Sequence[int], patched: Sequence[int]) -> dict[int, np.ndarray]:
        """Patches for ``patched`` fitted in layer order, each on the stream its layer sees once the earlier of
        ``layers`` are removed (dropped, or patched with their own sequential patch): one capture pass over the
        calibration sequences per patched layer. The ridge is chosen on the held-out sequences, as before; a layer
        whose sequential patch does no better than a drop there keeps its independent one."""
        sequences = self.calibration.arrays()
        _, held = split_sequences(len(sequences))
        refit: dict[int, np.ndarray] = {}
        width = int(self.model.n_embd())
        with progress_bar("sequential patches", len(patched) * len(sequences), self.progress) as tick:
            for layer in sorted(patched):
                upstream = recovered_edits([i for i in layers if i < layer], {i: refit.get(i, self.patches[i]) for i in patched if i < layer})
                stats = capture_statistics(self.probe, sequences, [layer], held, width, tick, upstream)
                _, error, matrix = best_patch(stats.fit[layer], stats.held[layer])
                refit[layer] = matrix if error < 1.0 else self.patches[layer]
        return refit

    def recover(self, name: str, layers: list[int]) -> Candidate:
        """``layers`` removed: patched where a validated patch exists, unless all dropped does better held out."""
        patched = [layer for layer in layers if layer in self.patches]
        kld_dropped = self.divergence(recovered_edits(layers, {}))
        written = self.as_written({layer: self.patches[layer] for layer in patched})
        kld_patched = self.divergence(recovered_edits(layers, written)) if patched else None
        if kld_patched is None or kld_patched >= kld_dropped:
            return Candidate(name, layers, [], kld_dropped, kld_patched, kld_dropped)
        return Candidate(name, layers, patched, kld_dropped, kld_patched, kld_patched)


def write_plan(src: Path, dst: Path, report: SelfPruneReport, *, force: bool, progress: bool) -> PruneResult:
    """Write the planned file: the report's layers removed, its patches as deci linear attention."""
    started = time.perf_counter()
    patches = report.patches
    result = prune_gguf(
        src, dst, report.layers, force=force, provenance=report.provenance(), progress=progress,
        linear_maps=patches.__getitem__ if patches else None, linear=sorted(patches),
    )
    report.seconds["write"] = time.perf_counter() - started
    report.seconds["total"] += report.seconds["write"]
    return result


def check_self_calibrated(src: Path, dst: Path, force: bool) -> None:
    """The source, the output path and the architecture, checked before any sampling."""
    if not src.is_file():
        raise GatenormError(f"{src}: no such file")
    check_output_path(src, dst, force)
    plan_rewrite(src, [1], {})  # refuses an architecture that cannot be pruned before any sampling
    architecture = GGUFFile(src).architecture
    if architecture not in SELF_CALIBRATED_ARCHS:
        raise GatenormError(
            f"{src}: the data-free default works on {' and '.join(SELF_CALIBRATED_ARCHS)} files, not "
            f"{architecture}; choose layers with --layers or --criterion per-head"
        )


def self_prune(
    src: Path,
    dst: Path,
    count: int,
    *,
    calib: Path | None = None,
    fixed: Sequence[int] | None = None,
    recover: bool = True,
    spec: CalibrationSpec = CalibrationSpec(),
    force: bool = False,
    n_threads: int | None = None,
    progress: bool = False,
) -> tuple[PruneResult, SelfPruneReport]:
    """The whole pipeline for ``count`` layers: plan, then write ``dst``; the output path and the count are
    checked before any sampling. (Budgets are ``chooser``'s.)"""
    src, dst = Path(src), Path(dst)
    check_self_calibrated(src, dst, force)
    check_count(count, gguf_geometry(src).n_layers)
    with contextlib.closing(
        SelfCalibratedPruner(src, calib=calib, spec=spec, recover=recover, n_threads=n_threads, progress=progress)
    ) as pruner:
        report = pruner.plan(count, fixed=fixed)
    return write_plan(src, dst, report, force=force, progress=progress), report
