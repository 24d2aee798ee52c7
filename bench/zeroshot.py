"""Benchmark: zero-shot examples per second with the shared context decoded once (KV reuse) vs per choice.

SmolLM2-135M (../shared/models, else the demo's cache), 1 thread, flash attention on, the first
EXAMPLES examples of a few tasks from ../shared/data. Each example is scored both ways back to back, the
order alternating from one example to the next (A B, B A, ...); the speed-up is the median of the
per-example time ratios (without reuse / with reuse), and both ways must give the same log-likelihoods.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np

from gatenorm_edge.fetch import fetch_model
from gatenorm_edge.harness.model import open_model
from gatenorm_edge.harness.zeroshot import choice_loglikelihoods, default_data_dir, load_task, tokenize_example

TASKS = ("hellaswag", "arc_easy", "boolq", "winogrande")
EXAMPLES = 8
THREADS = 1


def _timed(function) -> tuple[float, list[float]]:
    started = time.perf_counter()
    values = function()
    return time.perf_counter() - started, values


def run() -> dict:
    model_path = fetch_model("smollm2")
    data_dir = default_data_dir()
    per_task = {}
    with contextlib.closing(open_model(model_path, n_ctx=4096, n_threads=THREADS)) as model:
        for task in TASKS:
            reuse_times, fresh_times = [], []
            for number, example in enumerate(load_task(task, data_dir, limit=EXAMPLES)):
                choices = tokenize_example(model, example)
                ways = [True, False] if number % 2 == 0 else [False, True]
                timings = {}
                for reuse in ways:
                    timings[reuse] = _timed(lambda: choice_loglikelihoods(model, choices, reuse=reuse))
                np.testing.assert_allclose(timings[True][1], timings[False][1], rtol=1e-5, atol=1e-4)
                reuse_times.append(timings[True][0])
                fresh_times.append(timings[False][0])
            per_task[task] = {
                "examples": len(reuse_times),
                "reuse_examples_per_s": len(reuse_times) / sum(reuse_times),
                "no_reuse_examples_per_s": len(fresh_times) / sum(fresh_times),
                "speedup_median": statistics.median(f / r for f, r in zip(fresh_times, reuse_times)),
            }
    return {
        "model": str(model_path),
        "threads": THREADS,
        "flash_attn": True,
        "tasks": per_task,
        "note": "speedup = time without reuse / time with reuse, median over examples, interleaved per example",
    }
