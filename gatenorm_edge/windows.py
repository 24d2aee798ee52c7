"""Sliding-window layers instead of drops (``prune --mode window``): which layers can look back only W tokens,
and the attention-sink logit each windowed head needs, measured in llama.cpp on calibration text.

A windowed layer (``window_plan``) lets query p see keys p - W + 1 .. p, and head h's sink logit s_h joins its
softmax denominator. With full attention a query's output is (N_in + N_out) / (Z_in + Z_out), where Z sums
exp(logit) over the keys inside / outside the window and N the same weights times the values; windowed, it is
N_in / (Z_in + exp(s_h)). So a sink restores the weight full attention gave to what the window lost (the
first token above all, StreamingLLM's attention sink), though not its value.

1. **calibrate**: long sequences are built from the model's own samples (``harness.selfcal``): several samples
   one after another, the first of them repeated at the end, so that some heads must reach back past any
   window to copy it (the retrieval a pass-key test asks for). The last ``HELD_OUT`` sequences are held out.
2. **sinks**: one llama.cpp pass records every layer's Q, K and V (``harness.probe``). Per head, the squared
   error between full and windowed output is summed over queries for each sink on ``SINK_GRID`` (from three
   scalars per query, so the whole grid costs little), and the best sink on the fit sequences is kept.
3. **choose**: on the held-out sequences, each layer's damage is the energy of (full - windowed) attention
   output, after W_O and with the fitted sinks, relative to the residual stream's; the K least damaged
   layers are windowed. Layer 0 keeps full attention (the probe cannot edit it).
4. **check**: the chosen layers windowed together, against full attention, by KL divergence on the held-out
   sequences (the windows recomputed from llama.cpp's own Q/K/V, ``probe.WindowEdit``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import GatenormError
from .options import DEFAULT_CACHE_TYPE
from .speedmodel import Change
from .harness.model import LoadedModel, open_model
from .harness.probe import HeldOutDivergence, StreamEdits, StreamProbe, WindowEdit, last_only, windowed_attention
from .harness.selfcal import CalibrationSpec, self_calibration
from .progress import progress_bar
from .sources.gguf_file import GGUFFile
from .window_plan import NO_SINK

SINK_GRID = np.concatenate([[NO_SINK], np.arange(-4.0, 24.01, 0.25)])
QUERY_STRIDE = 2  # every other query enters the sink fit: the fit is a scalar per head
LONG_SEQUENCES = 8
HELD_OUT = 2
SAMPLE_LEN = 256
KLD_STRIDE = 4  # every 4th position of a held-out sequence's second half is scored
MAX_EXPONENT = 700.0  # e^700 is finite in float64; a larger sink changes nothing measurable


@dataclass
class HeadErrors:
    """Per head, summed over queries: squared error of the windowed output for each sink of ``SINK_GRID``,
    and the energy of the full output (the error of an output of zero)."""

    grid: np.ndarray
    energy: np.ndarray

    @classmethod
    def empty(cls, heads: int) -> HeadErrors:
        return cls(np.zeros((heads, len(SINK_GRID))), np.zeros(heads))

    def add(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int, stride: int = QUERY_STRIDE) -> None:
        """Fold one sequence's Q (tokens x heads x d), K and V (tokens x kv heads x d) into the sums."""
        n, heads, d = q.shape
        group = heads // k.shape[1]
        queries = np.arange(0, n, stride)
        distance = queries[:, None] - np.arange(n)[None, :]
        causal, inside = distance >= 0, (distance >= 0) & (distance < window)
        for h in range(heads):
            values = v[:, h // group]
            scores = q[queries, h] @ k[:, h // group].T / np.float32(np.sqrt(d))
            scores[~causal] = -np.inf
            top = scores.max(axis=1)
            weights = np.exp(scores - top[:, None])
            full = (weights @ values) / weights.sum(axis=1)[:, None]
            weights[~inside] = 0.0
            z_in, n_in = weights.sum(axis=1).astype(np.float64), (weights @ values).astype(np.float64)
            a, b, c = np.sum(full * full, axis=1), np.sum(full * n_in, axis=1), np.sum(n_in * n_in, axis=1)
            # 1 / (Z_in + e^(s - top)); a sink far above every score (qwen2 has queries whose best score is
            # below -300) sends it to 0, the windowed output to 0 and the error to a, with no overflow
            sink = np.exp(np.minimum(SINK_GRID[None, :] - top[:, None].astype(np.float64), MAX_EXPONENT))
            inverse = 1.0 / (z_in[:, None] + sink)
            self.grid[h] += np.sum(a[:, None] - 2 * b[:, None] * inverse + c[:, None] * inverse**2, axis=0)
            self.energy[h] += float(np.sum(a))

    def sinks(self) -> np.ndarray:
        """Each head's sink with the smallest summed error (``NO_SINK`` where a sink does not help)."""
        return SINK_GRID[np.argmin(self.grid, axis=1)].astype(np.float32)

    def relative(self, sinks: np.ndarray) -> float:
        """The layer's error at ``sinks`` (on the grid) relative to its full output's energy."""
        rows = [self.grid[h, int(np.argmin(np.abs(SINK_GRID - sinks[h])))] for h in range(len(sinks))]
        return float(np.sum(rows) / np.sum(self.energy))


@dataclass
class LayerWindow:
    """What was measured for one layer: its sinks, their fit, and its damage when windowed."""

    layer: int
    sinks: list[float]
    fit_error: float  # relative value-space error with the fitted sinks, fit sequences
    fit_error_no_sink: float
    damage: float | None = None  # held-out: |W_O (full - windowed)|^2 / |residual|^2
    damage_no_sink: float | None = None  # the same without sinks: what the fitted sinks win on held-out text


@dataclass
class WindowReport:
    """The window pipeline's decisions and measurements (``--json`` and the gatenorm.* metadata)."""

    count: int
    window: int
    layers: list[int]
    per_layer: list[LayerWindow]
    calibration: dict[str, Any]
    kld: float
    seconds: dict[str, float] = field(default_factory=dict)
    predicted: dict[str, Any] | None = None  # with a budget: the prediction the plan was chosen by

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def held_out_kld(self) -> float:
        return self.kld

    def change(self, cache_type: str = DEFAULT_CACHE_TYPE) -> Change:
        return Change(windowed=tuple(self.layers), window=self.window, cache_type=cache_type)

    def provenance(self) -> dict[str, str]:
        return {
            "selection": "windowed: least held-out damage with calibrated sinks",
            "calibration.tokens": str(self.calibration["tokens"]),
            "held_out_kld": f"{self.kld:.6f}",
        }


def long_sequences(samples: Sequence[Sequence[int]], length: int, bos: int | None) -> list[list[int]]:
    """Sequences of ``length`` tokens: samples (their BOS removed) one after another, the first of them again at
    the end; each sequence starts with BOS where the vocab has one."""
    lead = [bos] if bos is not None else []
    bodies = [list(s[len(lead):]) for s in samples]
    per = max(1, (length - len(lead)) // len(bodies[0]) - 1)
    out = []
    for start in range(0, len(bodies) - per + 1, per):
        group = bodies[start : start + per]
        tokens = lead + [t for body in group for t in body] + group[0]
        out.append(tokens[:length])
    return out


def output_damage(window: int, sinks: np.ndarray | None, w_o: np.ndarray, bias: np.ndarray | None, q: np.ndarray,
                  k: np.ndarray, v: np.ndarray, residual: np.ndarray, attention: np.ndarray) -> tuple[float, float]:
    """(sum |full - windowed|^2 after W_O, sum |residual|^2) over one sequence's tokens."""
    windowed = windowed_attention(q, k, v, window, sinks) @ w_o.T
    if bias is not None:
        windowed = windowed + bias
    return float(np.sum(np.square(attention - windowed, dtype=np.float64))), float(np.sum(np.square(residual, dtype=np.float64)))


class WindowChooser:
    """Stages 1-3 once per model and window (calibrate, fit sinks, measure damage); ``plan(K)`` for any K."""

    def __init__(self, model_path: Path, window: int, *, spec: CalibrationSpec = CalibrationSpec(),
                 n_threads: int | None = None, progress: bool = False) -> None:
        self.path, self.window, self.progress = Path(model_path), window, progress
        self.seconds: dict[str, float] = {}
        started = time.perf_counter()
        gguf = GGUFFile(model_path)
        self.outputs = {}
        self._closing = contextlib.ExitStack()
        try:
            self.model: LoadedModel = self._closing.enter_context(
                contextlib.closing(open_model(model_path, n_ctx=SAMPLE_LEN, n_threads=n_threads)))
            self.layers = list(range(1, self.model.geometry.n_layers))
            length = min(max(4 * window, 1024), self.model.geometry.context_length or 4 * window)
            samples = dataclasses.replace(spec, tokens=LONG_SEQUENCES * length, seq_len=SAMPLE_LEN)
            calibration = self_calibration(self.model, samples, progress=progress, label="1/4 sampling calibration text")
            self.sequences = long_sequences(calibration.sequences, length, self.model.bos_token)
            self.calibration = {"source": "self-sampled, joined into long sequences with a repeat", "tokens":
                                sum(map(len, self.sequences)), "sequences": len(self.sequences), "length": length,
                                "samples_sha256": calibration.sha256}
            self.seconds["calibrate"] = time.perf_counter() - started
            for layer in self.layers:
                bias = f"blk.{layer}.attn_output.bias"
                self.outputs[layer] = (gguf.tensor(f"blk.{layer}.attn_output.weight").astype(np.float32),
                                       gguf.tensor(bias).astype(np.float32) if gguf.has_tensor(bias) else None)
            self.probe = self._closing.enter_context(contextlib.closing(StreamProbe(self.model, length)))
            self._measure()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._closing.close()

    def _measure(self) -> None:
        fit, held = [np.asarray(s) for s in self.sequences[:-HELD_OUT]], [np.asarray(s) for s in self.sequences[-HELD_OUT:]]
        heads = self.model.geometry.head_count
        errors = {layer: HeadErrors.empty(heads[layer]) for layer in self.layers}
        captured: dict[int, tuple[np.ndarray, ...]] = {}
        mark = time.perf_counter()
        with progress_bar("2/4 fitting sinks", len(fit), self.progress) as tick:
            edits = StreamEdits(capture_qkv=frozenset(self.layers), on_qkv=lambda layer, *qkv: captured.__setitem__(layer, qkv))
            for index, sequence in enumerate(fit):
                self.probe.run([sequence], edits, lambda _i, _logits: None, last_only)
                for layer, (q, k, v) in captured.items():
                    errors[layer].add(q, k, v, self.window)
                captured.clear()
                tick(status=f"sequence {index + 1}")
        self.per_layer = {
            layer: LayerWindow(layer, errors[layer].sinks().tolist(), errors[layer].relative(errors[layer].sinks()),
                               errors[layer].relative(np.full(heads[layer], NO_SINK)))
            for layer in self.layers
        }
        self.seconds["sinks"] = time.perf_counter() - mark
        mark = time.perf_counter()
        lost = dict.fromkeys(self.layers, 0.0)
        lost_no_sink = dict.fromkeys(self.layers, 0.0)
        energy = dict.fromkeys(self.layers, 0.0)
        streams: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def measure(_index: int) -> None:
            for layer in self.layers:
                w_o, bias = self.outputs[layer]
                damage, total = output_damage(self.window, self.sinks(layer), w_o, bias, *captured[layer], *streams[layer])
                plain, _ = output_damage(self.window, None, w_o, bias, *captured[layer], *streams[layer])
                lost[layer] += damage
                lost_no_sink[layer] += plain
                energy[layer] += total
            captured.clear()
            streams.clear()
            tick()

        capturing = StreamEdits(
            capture=frozenset(self.layers), on_capture=lambda layer, x, _n, attention: streams.__setitem__(layer, (x, attention)),
            capture_qkv=frozenset(self.layers), on_qkv=lambda layer, *qkv: captured.__setitem__(layer, qkv),
        )
        with progress_bar("3/4 measuring damage", len(held), self.progress) as tick:
            self.divergence = HeldOutDivergence(self.probe, held, KLD_STRIDE, capturing, measure)
        for layer in self.layers:
            self.per_layer[layer].damage = lost[layer] / energy[layer]
            self.per_layer[layer].damage_no_sink = lost_no_sink[layer] / energy[layer]
        self.seconds["damage"] = time.perf_counter() - mark

    def sinks(self, layer: int) -> np.ndarray:
        return np.asarray(self.per_layer[layer].sinks, dtype=np.float32)

    def edits(self, layers: Sequence[int]) -> StreamEdits:
        return StreamEdits(window={layer: WindowEdit(self.window, self.sinks(layer), *self.outputs[layer]) for layer in layers})

    def plan(self, count: int) -> WindowReport:
        """The ``count`` least damaged layers windowed, and their held-out KLD."""
        if not 1 <= count <= len(self.layers):
            raise GatenormError(f"--count must be between 1 and {len(self.layers)} for windows (layer 0 stays full), not {count}")
        mark = time.perf_counter()
        chosen = sorted(sorted(self.layers, key=lambda layer: (self.per_layer[layer].damage, layer))[:count])
        with progress_bar("4/4 held-out KLD of the windowed layers", 1, self.progress) as tick:
            kld = self.divergence(self.edits(chosen))
            tick(status=f"KLD {kld:.4f}")
        seconds = self.seconds | {"check": time.perf_counter() - mark}
        seconds["total"] = sum(seconds.values())
        return WindowReport(count, self.window, chosen, [self.per_layer[layer] for layer in self.layers],
                            self.calibration, kld, seconds)
