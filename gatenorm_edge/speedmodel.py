"""A speed model of this CPU for one model: the predicted pp/tg speedup and the exact KV bytes of any set of
removed attention sublayers, from two short runs instead of a prune-and-bench per candidate.

Per-token time at a context depth is close to linear in the number of layers removed (a bound taken from
the fully pruned file predicted llama-bench within 1%). So three files are benchmarked interleaved
(``harness.speed.bench``) at the depths asked for: the model, the model with every removable layer but the
last dropped (``R`` layers: 1 .. n-2, since llama.cpp needs layer 0 and one more with attention), and the
same layers with a linear patch instead. Then, per kind (pp, tg) and depth,

    a = (t_base - t_dropped) / R     one layer's attention, seconds per token
    p = (t_patched - t_dropped) / R  one linear patch, seconds per token
    t(d dropped, l patched) = t_base - d * a - l * (a - p)

The measurement is cached by the model's sha256, the CPU model, threads, flash attention, depths and
bench settings (``~/.cache/gatenorm-edge/speed``), so a later prune with a budget needs no benchmark.
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
from .harness.model import default_threads, geometry_kv_bytes, training_context
from .harness.speed import KINDS, BenchResult, BenchSettings, bench
from .rewrite import prune_gguf
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
class SpeedModel:
    """Measured per-token seconds on this CPU: ``base``, ``attention`` (one layer) and ``patch`` (one linear
    patch), each keyed by kind (``pp``/``tg``) and then by depth (as a string, like ``bench --json``)."""

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

    def to_dict(self) -> dict:
        return asdict(self)

    def seconds_per_token(self, kind: str, depth: int, dropped: int, patched: int) -> float:
        if str(depth) not in self.base[kind]:
            raise GatenormError(f"the speed model was measured at depths {self.depths}, not {depth}")
        key = str(depth)
        attention = self.attention[kind][key]
        return self.base[kind][key] - dropped * attention - patched * (attention - self.patch[kind][key])

    def speedup(self, kind: str, depth: int, dropped: int, patched: int) -> float:
        """Predicted tokens/s of the pruned model over the base's."""
        pruned = self.seconds_per_token(kind, depth, dropped, patched)
        return self.base[kind][str(depth)] / pruned


def predicted(model: SpeedModel, depth: int, dropped: int, patched: int) -> dict[str, float]:
    """``{"tg_speedup", "pp_speedup"}`` at ``depth`` for a layer set with that many dropped and patched layers."""
    return {f"{kind}_speedup": model.speedup(kind, depth, dropped, patched) for kind in ("tg", "pp")}


def kv_bytes(path: Path, cells: int, removed: Collection[int], flash_attn: bool = True) -> int:
    """The KV cache llama.cpp allocates for ``cells`` positions once ``removed`` layers are attention-free."""
    return geometry_kv_bytes(gguf_geometry(path), cells, flash_attn, removed)


def _per_token(rates: dict[str, dict[str, dict]], label: str, kind: str, depth: str) -> float:
    return 1.0 / rates[kind][label][depth].median


def measure_speed_model(
    path: Path | str,
    settings: BenchSettings = SPEED_SETTINGS,
    *,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> SpeedModel:
    """The cached speed model of ``path`` on this CPU, measured (about a minute on SmolLM2) when missing."""
    path = Path(path)
    geometry = gguf_geometry(path)
    if geometry.attention_free or geometry.linear_attention:
        raise GatenormError(f"{path}: measure the speed model on the unpruned model, not on a pruned file")
    threads = settings.threads or default_threads()
    sha = file_sha256(path)
    key = json.dumps([sha, cpu_name(), threads, settings.flash_attn, list(settings.depths), settings.prompt,
                      settings.gen, settings.reps])
    cache = (cache_dir or cache_folder("speed")) / f"{sha[:16]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    stored = read_entry(cache, "speed-model")
    if stored is not None:
        return SpeedModel(**stored)
    removed = list(range(1, geometry.n_layers - 1))
    width = geometry.n_embd
    with work_folder("speed") as folder:
        dropped, patched = folder / "dropped.gguf", folder / "patched.gguf"
        prune_gguf(path, dropped, removed)
        prune_gguf(path, patched, removed, linear_maps=lambda layer: np.zeros((width, width), dtype=np.float32))
        result = bench([path, dropped, patched], settings, progress=progress)
    rates = {"pp": result.pp_tps, "tg": result.tg_tps}
    base: dict[str, dict[str, float]] = {kind: {} for kind in KINDS}
    attention: dict[str, dict[str, float]] = {kind: {} for kind in KINDS}
    patch: dict[str, dict[str, float]] = {kind: {} for kind in KINDS}
    for kind in KINDS:
        for depth in map(str, settings.depths):
            t_base, t_dropped, t_patched = (_per_token(rates, label, kind, depth) for label in result.models)
            base[kind][depth] = t_base
            attention[kind][depth] = (t_base - t_dropped) / len(removed)
            patch[kind][depth] = (t_patched - t_dropped) / len(removed)
    model = SpeedModel(
        str(path), sha, cpu_name(), threads, settings.flash_attn, list(settings.depths), len(removed),
        base, attention, patch, result.seconds,
    )
    write_entry(cache, model.to_dict())
    return model


def cached_speed_model(path: Path, threads: int, flash_attn: bool, depths: list[int]) -> SpeedModel | None:
    """A speed model measured earlier for this file, this CPU, threads and FA mode, covering ``depths``."""
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
        ) <= set(model.depths):
            return model
    return None


def attach_prediction(result: BenchResult) -> None:
    """Put the speed model's predicted ratios beside a two-model benchmark's measured ones, when the first
    model's speed model is in the cache for these settings and the second is a pruned file."""
    if len(result.models) != 2:
        return
    base, pruned = (Path(label.rstrip("'")) for label in result.models)
    speed = cached_speed_model(base, result.threads, result.flash_attn, result.depths)
    geometry = gguf_geometry(pruned)
    if speed is None or gguf_geometry(base).attention_free:
        return
    dropped, patched = len(geometry.attention_free), len(geometry.linear_attention)
    result.predicted = {
        kind: {str(depth): speed.speedup(kind, depth, dropped, patched) for depth in result.depths} for kind in KINDS
    }
