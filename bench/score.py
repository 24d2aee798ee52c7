"""Benchmark: Gate-Norm scoring of a 13B-shaped fp16 safetensors checkpoint (3 shards + index).

The checkpoint is written once by ``tools/make_13b_checkpoint.py`` into a cache folder outside the
repository ($GATENORM_BENCH_CACHE, default ~/.cache/gatenorm-edge/bench). Each scoring run is a
fresh child process (``score_model`` timed inside it; process wall time measured outside); its peak
RSS is the child's own ``ru_maxrss`` from ``wait4``; the bytes it fetched from storage (memory-mapped
reads included; about 0 when warm) come from /proc/self/io ``read_bytes``.

Floor = bytes the scorer must read / measured read bandwidth + FLOPs it must do / measured NumPy
float32 matmul rate (2048 x 2048 GEMM). Per-head FLOPs count only the distinct entries of each
head_dim x head_dim Gram matrix (head_dim (head_dim + 1) width per Gram), the least any exact Gram
method can do; the floor with each Gram counted as a plain matmul (2 head_dim^2 width) is reported
beside it for information. Widening fp16 to float32 is not in either floor. Warm: the shards are in
the page cache. Cold: each shard's pages are evicted first with posix_fadvise(DONTNEED) (no root
needed; the whole-system cache is not dropped; ``fincore`` confirms what was left resident).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gatenorm_edge.sources.safetensors_file import SafetensorsCheckpoint, TensorEntry
from tools.make_13b_checkpoint import N_HEADS, N_LAYERS, WIDTH, ensure_checkpoint

CACHE = Path(os.environ.get("GATENORM_BENCH_CACHE", Path.home() / ".cache" / "gatenorm-edge" / "bench"))
FOLDER = CACHE / "llama-13b-shape"
WARM_RUNS = 3
TARGET_SECONDS, TARGET_RSS_BYTES, TARGET_RATIO = 15.0, 1.5e9, 2.0

CHILD = """
import json, sys, time
from gatenorm_edge.scoring import score_model

def storage_bytes_read():
    with open("/proc/self/io") as io:
        return int(next(line.split()[1] for line in io if line.startswith("read_bytes")))

before, start = storage_bytes_read(), time.perf_counter()
report = score_model(sys.argv[1], sys.argv[2])
print(json.dumps({"score_seconds": time.perf_counter() - start, "storage_bytes_read": storage_bytes_read() - before,
                  "prune_order_head": report.prune_order[:5]}))
"""


def run_scorer(variant: str) -> dict[str, float]:
    """Score the checkpoint in a child process; its wall time, peak RSS and bytes read."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(FOLDER), variant], stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"scoring child failed with status {child.returncode}")
    result = json.loads(output)
    return result | {"wall_seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024}


def scored_entries() -> list[TensorEntry]:
    """The Q and K tensors: what the per-head and full variants must read."""
    checkpoint = SafetensorsCheckpoint(FOLDER)
    names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(N_LAYERS) for p in ("q", "k")]
    return [checkpoint.entry(name) for name in names]


def read_seconds(entries: list[TensorEntry]) -> float:
    """Read bandwidth: time to read these tensors' bytes with positioned reads into private buffers."""
    start = time.perf_counter()
    for entry in entries:
        with entry.path.open("rb") as handle:
            np.fromfile(handle, dtype=np.uint8, count=entry.nbytes, offset=entry.offset)
    return time.perf_counter() - start


def evict_page_cache() -> None:
    for shard in sorted(FOLDER.glob("*.safetensors")):
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes() -> int | None:
    """Bytes of the shards in the page cache (util-linux ``fincore``), or None where it is unavailable."""
    shards = [str(p) for p in sorted(FOLDER.glob("*.safetensors"))]
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *shards], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(field) for field in out.stdout.split())


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def summarize(runs: list[dict[str, float]], floor: float, matmul_count_floor: float | None = None) -> dict[str, object]:
    wall = statistics.median(r["wall_seconds"] for r in runs)
    peak = max(r["peak_rss_bytes"] for r in runs)
    informative = {}
    if matmul_count_floor is not None:
        informative = {
            "floor_seconds_if_grams_count_as_plain_matmuls": round(matmul_count_floor, 2),
            "wall_to_that_floor": round(wall / matmul_count_floor, 2),
        }
    return informative | {
        "runs_wall_seconds": [round(r["wall_seconds"], 2) for r in runs],
        "runs_score_seconds": [round(r["score_seconds"], 2) for r in runs],
        "wall_seconds_median": round(wall, 2),
        "score_seconds_median": round(statistics.median(r["score_seconds"] for r in runs), 2),
        "peak_rss_mb": round(peak / 1e6, 1),
        "storage_bytes_read": runs[0]["storage_bytes_read"],
        "floor_seconds": round(floor, 2),
        "wall_to_floor": round(wall / floor, 2),
        "meets_targets": {
            f"wall <= {TARGET_SECONDS:g} s": wall <= TARGET_SECONDS,
            f"peak RSS <= {TARGET_RSS_BYTES / 1e9:g} GB": peak <= TARGET_RSS_BYTES,
            f"wall <= {TARGET_RATIO:g}x floor": wall <= TARGET_RATIO * floor,
        },
        "prune_order_head": runs[0]["prune_order_head"],
    }


def run() -> dict[str, object]:
    generated = ensure_checkpoint(FOLDER)
    entries = scored_entries()
    must_read = sum(e.nbytes for e in entries)
    head_dim = WIDTH // N_HEADS
    per_head_flops = N_LAYERS * 2 * N_HEADS * head_dim * (head_dim + 1) * WIDTH
    per_head_matmul_flops = N_LAYERS * 2 * N_HEADS * 2 * head_dim * head_dim * WIDTH
    full_flops = N_LAYERS * 2 * WIDTH * WIDTH * WIDTH
    load_before = os.getloadavg()
    flop_rate = matmul_flops_per_second()

    read_seconds(entries)  # bring every scored byte into the page cache
    warm_bandwidth = must_read / read_seconds(entries)
    warm = [run_scorer("per-head") for _ in range(WARM_RUNS)]
    full = [run_scorer("full")]

    sample = entries[: len(entries) // 4]
    evict_page_cache()
    cold_bandwidth = sum(e.nbytes for e in sample) / read_seconds(sample)
    evict_page_cache()
    resident_before_cold = resident_bytes()
    cold = [run_scorer("per-head")]

    def floor(bandwidth: float, flops: int) -> float:
        return must_read / bandwidth + flops / flop_rate

    return {
        "checkpoint": {
            "folder": str(FOLDER),
            "geometry": f"{N_LAYERS} layers, width {WIDTH}, {N_HEADS} heads, fp16 safetensors in 3 shards + index",
            "bytes_scorer_must_read": must_read,
            "generated_now": generated,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "numpy": np.__version__,
        },
        "rates": {
            "matmul_gflops_f32": round(flop_rate / 1e9, 1),
            "read_gb_per_s_warm": round(warm_bandwidth / 1e9, 2),
            "read_gb_per_s_cold": round(cold_bandwidth / 1e9, 2),
        },
        "per_head_warm": summarize(warm, floor(warm_bandwidth, per_head_flops), floor(warm_bandwidth, per_head_matmul_flops)),
        "per_head_cold": summarize(cold, floor(cold_bandwidth, per_head_flops), floor(cold_bandwidth, per_head_matmul_flops))
        | {"page_cache_bytes_of_shards_before": resident_before_cold},
        "full_warm": summarize(full, floor(warm_bandwidth, full_flops)),
        "flops": {"per_head": per_head_flops, "per_head_as_plain_matmuls": per_head_matmul_flops, "full": full_flops},
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
