"""CPU speed and memory of GGUF models, measured the way ``llama-bench`` measures them.

pp: a prompt of ``prompt`` random tokens decoded in batches (BOS first when the vocab adds one), timed;
tg: ``gen`` single-token decodes, timed. Depth D (``llama-bench -d``): before each timed run the KV cache
already holds D random tokens; the filled cache is built once per depth and restored from a snapshot
(as llama-bench does), untimed. Each model lives in its own fresh worker process, so load time and peak
RSS are per model; with several models the runs are interleaved A B A B ..., and the ratios are the
median of pair-by-pair ratios (model k over model 1). With ``processes`` > 1 that is done again in fresh
processes, one set after another, and the medians are over every round of every set: pp at depth can
settle at a speed that differs by several percent from one process to the next (docs/budget.md), which
more rounds in one process cannot average out. Later sets restore the filled cache from the first set's
snapshot, so only the first pays for filling it. KV-cache bytes are the size llama.cpp reports
when it creates the context (``n_ctx`` cells = deepest depth + max(prompt, gen), rounded up to 256).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from ..errors import GatenormError
from ..fileio import proc_bytes
from ..options import DEFAULT_CACHE_TYPE
from ..native import describe_death
from .model import LoadedModel, default_threads, open_model
from ..progress import progress_bar

KINDS = ("pp", "tg")


@dataclass(frozen=True)
class BenchSettings:
    """What to run: the llama-bench knobs we support."""

    prompt: int = 512
    gen: int = 128
    depths: tuple[int, ...] = (0, 4096)
    reps: int = 5
    processes: int = 1  # fresh worker sets, one after another, each running ``reps`` rounds
    threads: int | None = None
    flash_attn: bool = True
    seed: int = 1234  # the random tokens: the same sequence for every model
    cache_type: str = DEFAULT_CACHE_TYPE  # the KV cache's type (llama-bench -ctk/-ctv)

    def __post_init__(self) -> None:
        if min(self.prompt, self.gen, self.reps, self.processes) < 1:
            raise GatenormError("--prompt, --gen, --reps and --processes must each be at least 1")
        if not self.depths or min(self.depths) < 0:
            raise GatenormError("--depth needs one or more depths >= 0, e.g. 0,4096")

    @property
    def n_ctx(self) -> int:
        return max(self.depths) + max(self.prompt, self.gen)


@dataclass
class _Runner:
    """Inside a worker: fills the cache to a depth, then times pp or tg runs.

    A filled cache is snapshotted per depth; with ``state_dir`` the snapshot is also written there, and a
    snapshot found there (an earlier worker's, same model and settings) is restored instead of filling.
    """

    model: LoadedModel
    settings: BenchSettings
    state_dir: Path | None = None
    rng: np.random.Generator = field(init=False)
    snapshots: dict[int, ctypes.Array] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.settings.seed)

    def random_tokens(self, count: int) -> np.ndarray:
        return self.rng.integers(0, self.model.vocab_size, size=count)

    def prompt(self, count: int, start: int) -> None:
        tokens = self.random_tokens(count)
        if self.model.bos_token is not None:
            tokens[0] = self.model.bos_token
        self.model.logits(tokens, start=start)

    def generate(self, count: int, start: int) -> None:
        bos = self.model.bos_token
        token = bos if bos is not None else int(self.random_tokens(1)[0])
        for step in range(count):
            self.model.logits([token], start=start + step)
            token = int(self.random_tokens(1)[0])

    def fill(self, depth: int) -> None:
        self.model.clear()
        if depth == 0:
            return
        saved = None if self.state_dir is None else self.state_dir / f"depth{depth}.state"
        if depth not in self.snapshots and saved is not None and saved.is_file():
            data = saved.read_bytes()
            self.snapshots[depth] = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if depth in self.snapshots:
            self.model.restore_state(self.snapshots[depth], depth)
        else:
            self.prompt(depth, 0)
            self.snapshots[depth] = self.model.save_state()
            if saved is not None:
                saved.write_bytes(bytes(self.snapshots[depth]))

    def warm_up(self) -> None:
        self.fill(0)
        self.prompt(self.settings.prompt, 0)
        self.fill(0)
        self.generate(1, 0)

    def timed(self, kind: str, depth: int) -> float:
        self.fill(depth)
        started = time.perf_counter()
        if kind == "pp":
            self.prompt(self.settings.prompt, depth)
        else:
            self.generate(self.settings.gen, depth)
        llama_cpp.llama_synchronize(self.model.ctx)
        return time.perf_counter() - started


def peak_rss_bytes() -> int:
    """This process's own peak resident set size.

    On Linux, ``VmHWM`` of its address space: ``ru_maxrss`` would not do, as it keeps the parent's RSS at
    fork time across the exec of a spawned worker, so every worker of a large parent reported the same
    figure. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on the other systems).
    """
    peak = proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _serve(conn: Connection, path: str, settings: BenchSettings, state_dir: str | None) -> None:
    """Worker process: load one model, answer ("warmup"|"pp"|"tg", depth) requests, report peak RSS at the end."""
    try:
        try:
            model = open_model(
                path, n_ctx=settings.n_ctx, flash_attn=settings.flash_attn, n_threads=settings.threads,
                cache_type=settings.cache_type,
            )
        except GatenormError as exc:
            conn.send(("error", str(exc)))
            return
        runner = _Runner(model, settings, None if state_dir is None else Path(state_dir))
        cells = int(llama_cpp.llama_n_ctx(model.ctx))
        conn.send(("ready", {"load_seconds": model.load_seconds, "kv_bytes": model.kv_bytes, "kv_cells": cells}))
        while (request := conn.recv()) is not None:
            kind, depth = request
            if kind == "warmup":
                runner.warm_up()
                conn.send(("ok", 0.0))
            else:
                conn.send(("ok", runner.timed(kind, depth)))
        conn.send(("ok", peak_rss_bytes()))
    except Exception:  # a bug, not bad input: hand the traceback to the parent
        conn.send(("crash", traceback.format_exc()))


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, path: Path, settings: BenchSettings, state_dir: Path | None = None) -> None:
        self.path = path
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        state = None if state_dir is None else str(state_dir)
        self.process = context.Process(target=_serve, args=(child_conn, str(path), settings, state), daemon=True)
        self.process.start()
        child_conn.close()
        self.info: dict[str, Any] = self._receive()

    def _receive(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise GatenormError(describe_death(f"{self.path}: the benchmark process", self.process.exitcode)) from None
        if status == "error":
            raise GatenormError(payload)
        if status == "crash":
            raise RuntimeError(f"benchmark worker for {self.path} failed:\n{payload}")
        return payload

    def ask(self, kind: str, depth: int) -> float:
        self.conn.send((kind, depth))
        return self._receive()

    def finish(self) -> int:
        """Stop the worker; its peak RSS in bytes."""
        self.conn.send(None)
        rss = self._receive()
        self.process.join(10)
        return rss

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


def model_labels(paths: Sequence[Path], cache_types: Sequence[str] | None = None) -> list[str]:
    """Labels for the JSON keys: the paths as given (with their KV-cache type where it is not the default), made
    unique."""
    labels: list[str] = []
    for index, path in enumerate(paths):
        cache = DEFAULT_CACHE_TYPE if cache_types is None else cache_types[index]
        label = str(path) if cache == DEFAULT_CACHE_TYPE else f"{path} (KV {cache})"
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


@dataclass
class Spread:
    """One test's tokens/s over its repetitions."""

    median: float
    min: float
    max: float
    samples: list[float]

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), values)


def paired_ratio(samples: Sequence[float], base: Sequence[float]) -> float:
    """The median of round-by-round ratios of two models' tokens/s (their runs interleaved, round i beside i)."""
    return statistics.median(a / b for a, b in zip(samples, base))


@dataclass
class BenchResult:
    """What ``bench`` measured, per model label; ``to_dict`` is the ``bench --json`` contract."""

    models: list[str]
    depths: list[int]
    prompt: int
    gen: int
    reps: int
    processes: int
    threads: int
    flash_attn: bool
    pp_tps: dict[str, dict[str, Spread]]
    tg_tps: dict[str, dict[str, Spread]]
    ratios: dict[str, dict[str, float]]
    kv_bytes: dict[str, int | None]
    kv_cells: dict[str, int]
    load_seconds: dict[str, float]
    rss_bytes: dict[str, int]
    seconds: float
    predicted: dict[str, dict[str, float]] | None = None  # ratios the speed model predicts (``speedmodel``)
    cache_types: dict[str, str] = field(default_factory=dict)  # each model's KV-cache type
    paths: list[str] = field(default_factory=list)  # each model's file, in the order of ``models``

    def tps(self, kind: str) -> dict[str, dict[str, Spread]]:
        """``pp_tps`` or ``tg_tps``."""
        return self.pp_tps if kind == "pp" else self.tg_tps

    def ratio(self, kind: str, depth: int, label: str) -> float:
        """The median of pair-by-pair tokens/s ratios, ``label`` over the first model, in one depth's runs."""
        rates = self.tps(kind)
        return paired_ratio(rates[label][str(depth)].samples, rates[self.models[0]][str(depth)].samples)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench(
    models: Sequence[Path | str], settings: BenchSettings = BenchSettings(), progress: bool = False,
    cache_types: Sequence[str] | None = None,
) -> BenchResult:
    """Benchmark one or more models interleaved, in ``settings.processes`` fresh sets of worker processes.
    ``cache_types`` gives each model its own KV-cache type (default: ``settings.cache_type`` for all), so a file
    with a quantized cache can be timed against the base with llama.cpp's default one."""
    paths = [Path(m) for m in models]
    caches = list(cache_types) if cache_types is not None else [settings.cache_type] * len(paths)
    for path in paths:
        if not path.is_file():
            raise GatenormError(f"{path}: no such file")
    labels = model_labels(paths, caches)
    threads = settings.threads or default_threads()
    settings = dataclasses.replace(settings, threads=threads)
    counts = {"pp": settings.prompt, "tg": settings.gen}
    tps: dict[str, dict[str, dict[int, list[float]]]] = {
        kind: {label: {d: [] for d in settings.depths} for label in labels} for kind in KINDS
    }
    rss = dict.fromkeys(labels, 0)
    started = time.perf_counter()
    steps = settings.processes * len(settings.depths) * settings.reps * len(KINDS) * len(paths)
    with contextlib.ExitStack() as stack:
        tick = stack.enter_context(progress_bar("bench " + " vs ".join(p.name for p in paths), steps, progress))
        state_root = Path(stack.enter_context(tempfile.TemporaryDirectory())) if settings.processes > 1 else None
        for _set in range(settings.processes):
            workers = _start_workers(paths, caches, settings, state_root)
            try:
                for worker in workers:
                    worker.ask("warmup", 0)
                for depth in settings.depths:
                    for _ in range(settings.reps):
                        for kind in KINDS:
                            for label, worker in zip(labels, workers):
                                rate = counts[kind] / worker.ask(kind, depth)
                                tps[kind][label][depth].append(rate)
                                tick(status=f"{kind} d{depth} {rate:.1f} t/s")
                for label, worker in zip(labels, workers):
                    rss[label] = max(rss[label], worker.finish())
            finally:
                for worker in workers:
                    worker.kill()
    result = BenchResult(
        models=labels,
        depths=list(settings.depths),
        prompt=settings.prompt,
        gen=settings.gen,
        reps=settings.reps,
        processes=settings.processes,
        threads=threads,
        flash_attn=settings.flash_attn,
        cache_types=dict(zip(labels, caches)),
        paths=[str(path) for path in paths],
        pp_tps={label: {str(d): Spread.of(v) for d, v in tps["pp"][label].items()} for label in labels},
        tg_tps={label: {str(d): Spread.of(v) for d, v in tps["tg"][label].items()} for label in labels},
        ratios={kind: {} for kind in KINDS},
        # KV bytes and cells are the same in every set; the load time is the last set's (the page cache warm)
        kv_bytes={label: w.info["kv_bytes"] for label, w in zip(labels, workers)},
        kv_cells={label: w.info["kv_cells"] for label, w in zip(labels, workers)},
        load_seconds={label: w.info["load_seconds"] for label, w in zip(labels, workers)},
        rss_bytes=rss,
        seconds=time.perf_counter() - started,
    )
    if len(labels) > 1:
        result.ratios = {kind: {str(d): result.ratio(kind, d, labels[1]) for d in settings.depths} for kind in KINDS}
    return result


def _start_workers(paths: list[Path], caches: list[str], settings: BenchSettings, state_root: Path | None) -> list[_Worker]:
    """One fresh worker per model; with ``state_root``, model i keeps its cache snapshots in ``state_root/i``."""
    workers: list[_Worker] = []
    try:
        for index, path in enumerate(paths):
            state_dir = None if state_root is None else state_root / str(index)
            if state_dir is not None:
                state_dir.mkdir(exist_ok=True)
            workers.append(_Worker(path, dataclasses.replace(settings, cache_type=caches[index]), state_dir))
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    return workers
