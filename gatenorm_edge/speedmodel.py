"""A speed model of this CPU for one model: the predicted pp/tg speedup and the exact KV bytes of any set of
removed or windowed attention sublayers, with any KV-cache type, from one short run instead of a prune-and-bench
per candidate.

Per-token time at a context depth is close to linear in the number of layers removed (a bound taken from
the fully pruned file predicted llama-bench within 1%). So these files are benchmarked interleaved
(``harness.speed.bench``) at the depths asked for, all with the KV-cache type asked for: the model, the model
with every removable layer but the last dropped (``R`` layers: 1 .. n-2, since llama.cpp needs layer 0 and one
more with attention), the same layers with a linear patch instead, and, for a window W, the same layers
windowed to W tokens (granite_swa). The unchanged model is also timed with every other KV-cache type it can
take, llama.cpp's default F16 among them: every speedup is over that, the baseline a user has, and what a
quantized cache alone gives is known too. Then, per kind (pp, tg) and depth,

    a = (t_base - t_dropped) / R      one layer's attention, seconds per token
    p = (t_patched - t_dropped) / R   one linear patch
    w = (t_windowed - t_dropped) / R  one windowed layer (its attention over the last W tokens only)
    t(d dropped, l patched, v windowed) = t_base - d * a - l * (a - p) - v * (a - w)
    speedup = t_f16 / t               (t_f16: the unchanged model with an F16 cache)

The measurement is cached by the model's sha256, the CPU model, threads, flash attention, cache type, window,
depths and bench settings (``~/.cache/gatenorm-edge/speed``), so a later prune with a budget needs no benchmark.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import GatenormError
from .cache import read_entry, write_entry
from .fileio import cache_folder, file_sha256, work_folder
from .harness.model import cache_type_fits, default_threads, geometry_kv_bytes, training_context
from .harness.speed import KINDS, BenchResult, BenchSettings, bench
from .options import CACHE_TYPES, DEFAULT_CACHE_TYPE
from .rewrite import prune_gguf, window_gguf
from .sources import GGUFFile
from .sources.geometry import gguf_geometry

SPEED_SETTINGS = BenchSettings(prompt=256, gen=32, depths=(0, 4096), reps=3)


def deepest_depth(path: Path) -> int | None:
    """The deepest depth the speed model can time: the training context less the timed prompt (None when the
    model does not say its context)."""
    trained = training_context(GGUFFile(path))
    return None if trained is None else trained - SPEED_SETTINGS.prompt


def speed_settings(path: Path, depths: Collection[int]) -> BenchSettings:
    """The speed model's settings at ``depths``, the deepest cut to ``deepest_depth`` (SmolLM2: 7936 for 8192)."""
    deepest = deepest_depth(path)
    cut = {depth if deepest is None else min(depth, deepest) for depth in depths}
    return dataclasses.replace(SPEED_SETTINGS, depths=tuple(sorted(cut)))


def cpu_name() -> str:
    """The CPU model as the system names it (Linux: /proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Change:
    """What a plan does to a model's attention (which layers it drops, patches, windows to ``window`` tokens),
    and the KV-cache type it will run with."""

    dropped: tuple[int, ...] = ()
    patched: tuple[int, ...] = ()
    windowed: tuple[int, ...] = ()
    window: int | None = None
    cache_type: str = DEFAULT_CACHE_TYPE

    def kv_bytes(self, path: Path, cells: int, flash_attn: bool = True) -> int:
        """The KV cache llama.cpp allocates for ``cells`` positions of ``path`` so changed."""
        return geometry_kv_bytes(gguf_geometry(path), cells, flash_attn, self.dropped + self.patched,
                                 cache_type=self.cache_type, windowed=self.windowed, window=self.window)


@dataclass(frozen=True)
class SpeedModel:
    """Measured per-token seconds on this CPU: ``base``, ``attention`` (one layer), ``patch`` (one linear patch)
    and ``windowed`` (one layer windowed to ``window`` tokens), all with a ``cache_type`` KV cache, and
    ``unchanged``: the model with each KV-cache type it can take; each keyed by kind (``pp``/``tg``) and then by
    depth (as a string, like ``bench --json``)."""

    model: str
    model_sha256: str
    cpu: str
    threads: int
    flash_attn: bool
    depths: list[int]
    removed_in_probe: int
    base: dict[str, dict[str, float]]
    attention: dict[str, dict[str, float]]
    patch: dict[str, dict[str, float]]
    seconds: float
    cache_type: str = DEFAULT_CACHE_TYPE
    unchanged: dict[str, dict[str, dict[str, float]]] = dataclasses.field(default_factory=dict)
    window: int | None = None
    windowed: dict[str, dict[str, float]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def covers(self, change: Change) -> bool:
        """Whether this model was measured for ``change``'s cache type and (if it windows) its window."""
        if not (change.dropped or change.patched or change.windowed):
            return change.cache_type in self.unchanged or change.cache_type == self.cache_type
        return change.cache_type == self.cache_type and (not change.windowed or change.window == self.window)

    def seconds_per_token(self, kind: str, depth: int, change: Change) -> float:
        key = str(depth)
        if key not in self.base[kind]:
            raise GatenormError(f"the speed model was measured at depths {self.depths}, not {depth}")
        if not self.covers(change):
            raise GatenormError(
                f"the speed model was measured with a {self.cache_type} cache and window {self.window}, not "
                f"{change.cache_type} and {change.window}"
            )
        if not (change.dropped or change.patched or change.windowed) and change.cache_type in self.unchanged:
            return self.unchanged[change.cache_type][kind][key]
        attention = self.attention[kind][key]
        seconds = self.base[kind][key] - len(change.dropped) * attention
        seconds -= len(change.patched) * (attention - self.patch[kind][key])
        if change.windowed:
            seconds -= len(change.windowed) * (attention - self.windowed[kind][key])
        return seconds

    def speedup(self, kind: str, depth: int, change: Change) -> float:
        """Predicted tokens/s of the changed model, with its cache type, over the base's with an F16 cache."""
        seconds = self.seconds_per_token(kind, depth, change)
        return self.unchanged.get(DEFAULT_CACHE_TYPE, self.base)[kind][str(depth)] / seconds


def predicted(model: SpeedModel, depth: int, change: Change) -> dict[str, float]:
    """``{"tg_speedup", "pp_speedup"}`` at ``depth`` for ``change``."""
    return {f"{kind}_speedup": model.speedup(kind, depth, change) for kind in ("tg", "pp")}


def measure_speed_model(
    path: Path | str,
    settings: BenchSettings = SPEED_SETTINGS,
    *,
    window: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> SpeedModel:
    """The cached speed model of ``path`` on this CPU with ``settings.cache_type`` (and windows of ``window``
    tokens), measured (about a minute on SmolLM2) when missing."""
    path = Path(path)
    geometry = gguf_geometry(path)
    if geometry.attention_free or geometry.linear_attention or geometry.windowed:
        raise GatenormError(f"{path}: measure the speed model on the unpruned model, not on a pruned file")
    threads = settings.threads or default_threads()
    sha = file_sha256(path)
    key = json.dumps([sha, cpu_name(), threads, settings.flash_attn, list(settings.depths), settings.prompt,
                      settings.gen, settings.reps, settings.cache_type, window])
    cache = (cache_dir or cache_folder("speed")) / f"{sha[:16]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    stored = read_entry(cache, "speed-model")
    if stored is not None:
        return SpeedModel(**stored)
    removed = list(range(1, geometry.n_layers - 1))
    width = geometry.n_embd
    with work_folder("speed") as folder:
        files = {"base": path, "dropped": folder / "dropped.gguf", "patched": folder / "patched.gguf"}
        prune_gguf(path, files["dropped"], removed)
        prune_gguf(path, files["patched"], removed, linear_maps=lambda layer: np.zeros((width, width), dtype=np.float32))
        if window is not None:
            files["windowed"] = folder / "windowed.gguf"
            window_gguf(path, files["windowed"], removed, window)
        caches = [settings.cache_type] * len(files)
        others = [ct for ct in CACHE_TYPES if ct != settings.cache_type and cache_type_fits(path, ct, settings.flash_attn)]
        for cache_type in others:
            files[f"unchanged {cache_type}"] = path
            caches.append(cache_type)
        result = bench(list(files.values()), settings, progress=progress, cache_types=caches)
    rates = {"pp": result.pp_tps, "tg": result.tg_tps}
    per_token = {
        name: {kind: {d: 1.0 / rates[kind][label][d].median for d in map(str, settings.depths)} for kind in KINDS}
        for name, label in zip(files, result.models)
    }

    def per_layer(name: str) -> dict[str, dict[str, float]]:
        return {kind: {d: (per_token[name][kind][d] - per_token["dropped"][kind][d]) / len(removed)
                       for d in map(str, settings.depths)} for kind in KINDS}

    unchanged = {settings.cache_type: per_token["base"]} | {ct: per_token[f"unchanged {ct}"] for ct in others}
    model = SpeedModel(
        str(path), sha, cpu_name(), threads, settings.flash_attn, list(settings.depths), len(removed),
        per_token["base"], per_layer("base"), per_layer("patched"), result.seconds, settings.cache_type,
        unchanged, window, per_layer("windowed") if window is not None else None,
    )
    write_entry(cache, model.to_dict())
    return model


def cached_speed_model(path: Path, threads: int, flash_attn: bool, depths: list[int], change: Change) -> SpeedModel | None:
    """A speed model measured earlier for this file, this CPU, threads and FA mode, covering ``depths`` and
    ``change`` (its cache type and window)."""
    folder = cache_folder("speed")
    if not any(folder.glob("*.json")):
        return None  # nothing measured on this machine: no need to hash the model
    sha = file_sha256(path)
    for entry in sorted(folder.glob(f"{sha[:16]}-*.json")):
        stored = read_entry(entry, "speed-model")
        if stored is None:
            continue
        model = SpeedModel(**stored)
        if (model.model_sha256, model.cpu, model.threads, model.flash_attn) == (sha, cpu_name(), threads, flash_attn) and set(
            depths
        ) <= set(model.depths) and model.covers(change):
            return model
    return None


def change_of(path: Path, cache_type: str = DEFAULT_CACHE_TYPE) -> Change:
    """What a pruned or windowed file changes, run with a ``cache_type`` cache."""
    g = gguf_geometry(path)
    return Change(tuple(g.attention_free), tuple(g.linear_attention), g.windowed, g.window if g.windowed else None,
                  cache_type)


def attach_prediction(result: BenchResult) -> None:
    """Put the speed model's predicted ratios beside a two-model benchmark's measured ones, when the first model
    is an unchanged model with an F16 cache whose speed model for the second's cache type (and window) is in the
    cache for these settings."""
    if len(result.models) != 2:
        return
    base, changed = (Path(path) for path in result.paths)
    base_cache, changed_cache = (result.cache_types.get(label, DEFAULT_CACHE_TYPE) for label in result.models)
    if base_cache != DEFAULT_CACHE_TYPE or change_of(base) != Change():
        return
    change = change_of(changed, changed_cache)
    speed = cached_speed_model(base, result.threads, result.flash_attn, result.depths, change)
    if speed is None:
        return
    result.predicted = {kind: {str(depth): speed.speedup(kind, depth, change) for depth in result.depths} for kind in KINDS}
