"""Sliding-window layers (granite_swa): the rewrite is exact, windowed attention with sinks matches an independent
NumPy reference, the sink fit is the arithmetic it claims, llama.cpp runs the files with a small SWA cache, and
`prune --mode window` writes a file and refuses what it cannot do in one line."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, llama_cpp_logits, run_cli_here
from gatenorm_edge import budget as budget_module
from gatenorm_edge.errors import GatenormError
from gatenorm_edge.harness.model import geometry_kv_bytes, open_model
from gatenorm_edge.harness.probe import StreamEdits, StreamProbe, WindowEdit, windowed_attention
from gatenorm_edge.reference import ReferenceModel
from gatenorm_edge.rewrite import prune_gguf, window_gguf
from gatenorm_edge.sources.geometry import gguf_geometry
from gatenorm_edge.speedmodel import SpeedModel
from gatenorm_edge.sources.gguf_file import GGUFFile
from gatenorm_edge.window_plan import NO_SINK
from gatenorm_edge.windows import SINK_GRID, HeadErrors, long_sequences

TOKENS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 300, 281, 477, 390,
          265, 401, 311, 428, 297, 356, 442, 306, 273, 415, 398, 288, 330, 462, 301, 377, 349, 285, 411, 369]


def random_sinks(heads: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {layer: rng.normal(0.5, 1.5, heads).astype(np.float32) for layer in range(5)}


def test_every_layer_windowed_wider_than_the_context_gives_the_original_logits(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.gguf"
    result = window_gguf(stories260k, out, range(5), 1024)  # no sinks: NO_SINK everywhere
    assert (result.target, result.windowed_layers, result.window) == ("granite_swa", [0, 1, 2, 3, 4], 1024)
    assert result.bytes_out > result.bytes_in and result.dropped_tensors == []
    assert np.array_equal(llama_cpp_logits(out, TOKENS), llama_cpp_logits(stories260k, TOKENS))


def test_a_qwen2_file_windowed_wider_than_the_context_keeps_its_logits(tiny_qwen2: Path, tmp_path: Path) -> None:
    # NEOX rows are reordered for granite_swa's normal RoPE, and the q/k/v biases with them (as for deci)
    out = tmp_path / "q.gguf"
    assert len(window_gguf(tiny_qwen2, out, [1, 2], 1024).permuted_tensors) == 4 * 5
    np.testing.assert_allclose(llama_cpp_logits(out, TOKENS), llama_cpp_logits(tiny_qwen2, TOKENS), atol=1e-4)


@pytest.mark.parametrize("flash_attn", [False, True])
def test_windowed_layers_with_sinks_match_the_numpy_reference(stories260k: Path, tmp_path: Path, flash_attn: bool) -> None:
    out = tmp_path / "w.gguf"
    window_gguf(stories260k, out, [1, 3], 8, random_sinks(8).__getitem__)
    expected = ReferenceModel.from_gguf(out).forward(TOKENS)  # written from the architecture: mask, sink, softmax
    moved = np.abs(expected - ReferenceModel.from_gguf(stories260k).forward(TOKENS)).max()
    got = llama_cpp_logits(out, TOKENS, flash_attn=flash_attn)
    assert moved > 1.0 and np.abs(got - expected).max() < (1e-4 if not flash_attn else 0.05)


def test_the_probe_windows_a_layer_as_the_file_does(stories260k: Path, tmp_path: Path) -> None:
    sinks = random_sinks(8, seed=1)
    out = tmp_path / "w.gguf"
    window_gguf(stories260k, out, [2, 4], 8, sinks.__getitem__)
    model = GGUFFile(stories260k)
    edits = StreamEdits(window={
        layer: WindowEdit(8, sinks[layer], model.tensor(f"blk.{layer}.attn_output.weight").astype(np.float32)) for layer in (2, 4)
    })
    logits: dict[str, np.ndarray] = {}
    for name, path, changes in (("probe", stories260k, edits), ("file", out, StreamEdits()), ("base", stories260k, StreamEdits())):
        with contextlib.closing(open_model(path, n_ctx=64, n_threads=1)) as loaded, contextlib.closing(StreamProbe(loaded, 64)) as probe:
            probe.run([np.asarray(TOKENS)], changes, lambda _i, rows: logits.__setitem__(name, rows))
    assert np.abs(logits["probe"] - logits["file"]).max() < 0.1 < np.abs(logits["base"] - logits["file"]).max()


def assert_grid_is_the_reference(
    errors: HeadErrors, q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int, indexes: tuple[int, ...]
) -> np.ndarray:
    """Each grid column in ``indexes`` equals the squared error of the NumPy reference's windowed attention
    with that sink on every head; returns full attention's output (tokens x heads x d)."""
    shape = q.shape
    full = windowed_attention(q, k, v, 10_000).reshape(shape)
    for index in indexes:
        sinks = np.full(shape[1], SINK_GRID[index])
        direct = np.sum((full - windowed_attention(q, k, v, window, sinks).reshape(shape)) ** 2, axis=(0, 2))
        np.testing.assert_allclose(errors.grid[:, index], direct, rtol=1e-4)
    return full


def test_the_sink_grid_sums_the_errors_it_claims() -> None:
    rng = np.random.default_rng(3)
    q, k, v = rng.normal(size=(40, 4, 8)), rng.normal(size=(40, 2, 8)), rng.normal(size=(40, 2, 8))
    q[:, :, 0] += 3.0
    k[0, :, 0] = 6.0  # a first token every head attends to: the sink's job once it leaves the window
    errors = HeadErrors.empty(4)
    errors.add(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), window=6, stride=1)
    full = assert_grid_is_the_reference(errors, q, k, v, 6, (0, 37, len(SINK_GRID) - 1))
    np.testing.assert_allclose(errors.energy, np.sum(full**2, axis=(0, 2)), rtol=1e-5)
    best = errors.sinks()
    assert np.all(errors.grid[np.arange(4), np.searchsorted(SINK_GRID, best)] <= errors.grid[:, 0])
    assert errors.relative(best) < errors.relative(np.full(4, NO_SINK))


def test_the_sink_grid_stays_exact_where_every_score_lies_far_below_the_sinks() -> None:
    """qwen2.5-coder-1.5b has heads whose best score is below -300: e^(s - top) then squares past float64."""
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(24, 2, 8)), rng.normal(size=(24, 1, 8)), rng.normal(size=(24, 1, 8))
    q[:, :, 0], k[:, :, 0] = -23.0, 50.0  # every score near -23 * 50 / sqrt(8) = -407
    errors = HeadErrors.empty(2)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        errors.add(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), window=4, stride=1)
    assert_grid_is_the_reference(errors, q, k, v, 4, (0, 1, len(SINK_GRID) - 1))
    np.testing.assert_allclose(errors.grid[:, -1], errors.energy, rtol=1e-6)  # the sink swallows the window


def test_long_sequences_repeat_their_first_sample_at_the_end() -> None:
    samples = [[1, *range(10 * i, 10 * i + 9)] for i in range(1, 7)]
    joined = long_sequences(samples, 28, bos=1)
    assert [len(s) for s in joined] == [28, 28, 28]
    assert joined[0] == [1, *range(10, 19), *range(20, 29), *range(10, 19)]


def test_llama_cpp_gives_windowed_layers_the_small_swa_cache(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.gguf"
    window_gguf(stories260k, out, [1, 2, 3], 64)
    with contextlib.closing(open_model(out, n_ctx=2048, n_threads=1)) as model:
        swa = model.kv_bytes
    with contextlib.closing(open_model(stories260k, n_ctx=2048, n_threads=1)) as model:
        full = model.kv_bytes
    # 2 full layers x 2048 cells + 3 windowed x 768 cells (64 + one 512-token micro-batch, in pages of 256)
    per_cell = 2 * 2 * 32  # K and V, 4 KV heads x 8, F16
    assert (full, swa) == (5 * 2048 * per_cell, (2 * 2048 + 3 * 768) * per_cell)
    assert geometry_kv_bytes(gguf_geometry(stories260k), 2048, True, windowed=[1, 2, 3], window=64) == swa


def test_prune_mode_window_writes_granite_swa_and_reports_it(stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path / "cache"))
    out, report = tmp_path / "w.gguf", tmp_path / "w.json"
    done = run_cli_here("prune", stories260k, out, "--count", "2", "--mode", "window", "--window", "64", "--json", report)
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    windows = data["windows"]
    assert data["target"] == "granite_swa" and data["windowed_layers"] == windows["layers"] and len(windows["layers"]) == 2
    assert 0 not in windows["layers"] and windows["kld"] > 0
    geometry = gguf_geometry(out)
    assert geometry.windowed == tuple(windows["layers"]) and geometry.window == 64
    chosen = {entry["layer"]: entry for entry in windows["per_layer"]}
    assert sorted(chosen, key=lambda layer: chosen[layer]["damage"])[:2] == sorted(windows["layers"], key=lambda layer: chosen[layer]["damage"])
    sinks = GGUFFile(out).tensor(f"blk.{windows['layers'][0]}.attn_sinks.weight")
    assert np.allclose(sinks, chosen[windows["layers"][0]]["sinks"])
    assert "windowed layers" in run_cli_here("inspect", out).stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--count", "2", "--mode", "window", "--window", "2048"], "not below stories260K.gguf's training context of 2048"),
        (["--count", "2", "--mode", "window", "--window", "0"], "--window must be at least 1"),
        (["--count", "5", "--mode", "window", "--window", "64"], "--count must be between 1 and 4 for windows"),
        (["--layers", "2", "--mode", "window"], "--mode window chooses its own layers"),
        (["--kv-budget", "1000", "--ctx", "1024", "--mode", "window", "--window", "64"], "out of reach at --ctx 1024"),
        (["--count", "2", "--cache-type", "q8_0"], "--cache-type goes with --speedup or --kv-budget"),
    ],
)
def test_bad_window_requests_are_one_line_and_write_nothing(stories260k: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out.gguf"
    assert_one_line_error(run_cli_here("prune", stories260k, out, *args), message)
    assert not out.exists()


def test_windows_refuse_files_granite_swa_cannot_hold(stories260k: Path, gemma3: Path, tmp_path: Path) -> None:
    pruned = tmp_path / "p.gguf"
    prune_gguf(stories260k, pruned, [2])
    out = tmp_path / "out.gguf"
    assert_one_line_error(run_cli_here("prune", pruned, out, "--count", "1", "--mode", "window", "--window", "64"),
                          "windows need every layer's attention")
    assert_one_line_error(run_cli_here("prune", gemma3, out, "--count", "1", "--mode", "window", "--window", "64"),
                          "cannot window architecture 'gemma3'")
    with pytest.raises(GatenormError, match="already a granite_swa file"):
        window_gguf(stories260k, tmp_path / "w.gguf", [1], 64)
        window_gguf(tmp_path / "w.gguf", out, [1], 64)
    assert not out.exists()


def test_the_frontier_is_the_points_nothing_beats_on_both_counts() -> None:
    from gatenorm_edge.frontier import Point, Variant, pareto

    def point(name: str, speedup: float, ratio: float) -> Point:
        return Point(Variant(name, f"{name}.gguf", "f16", "drop"), 10 * ratio, 0.1, 100, 10.0, 20.0, speedup, 1.0, ratio)

    points = [point("base", 1.0, 1.0), point("q8", 2.0, 1.0), point("slow", 1.5, 1.2), point("fast", 2.5, 1.4),
              point("twin", 2.0, 1.0)]
    pareto(points)
    assert [p.variant.name for p in points if p.frontier] == ["q8", "fast", "twin"]  # ties both stay


@pytest.mark.parametrize(("worst", "scale"), [(3.2, "linear"), (231.0, "log")])
def test_the_frontier_plot_turns_logarithmic_when_ratios_span_more_than_ten(worst: float, scale: str) -> None:
    from gatenorm_edge.frontier import FrontierResult, Point, Variant
    from gatenorm_edge.plots import frontier_figure, require_matplotlib

    points = [Point(Variant(name, "m.gguf", "f16", "base"), 10 * ratio, 0.1, 100, 10.0, 20.0, speedup, 1.0, ratio)
              for name, speedup, ratio in (("base f16", 1.0, 1.0), ("base q4_0", 0.7, worst), ("window", 1.2, 0.98))]
    figure = frontier_figure(FrontierResult("m.gguf", "t.txt", 2048, 5, 4096, 512, 2, points, {}))
    assert figure.axes[0].get_yscale() == scale
    require_matplotlib().close(figure)


def test_a_window_budget_takes_the_fewest_windowed_layers(stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path / "cache"))
    out, report = tmp_path / "w.gguf", tmp_path / "w.json"
    cells = 2048  # stories260K's whole training context: full layers hold 2048 cells, windowed ones 768
    full = 5 * cells * 128
    budget = full - 2 * (cells - 768) * 128  # two windowed layers fit, one does not
    done = run_cli_here("prune", stories260k, out, "--kv-budget", str(budget), "--ctx", str(cells), "--mode", "window",
                        "--window", "64", "--json", report)
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert len(data["windows"]["layers"]) == 2 and data["predicted"]["kv_bytes"] == budget
    with contextlib.closing(open_model(out, n_ctx=cells, n_threads=1)) as model:
        assert model.kv_bytes == budget  # what llama.cpp allocated for the written file


def test_frontier_makes_measures_and_ranks_every_variant(stories260k: Path, tinystories: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path / "cache"))
    measure = budget_module.measure_speed_model

    def steady(*args: Any, **kwargs: Any) -> SpeedModel:
        """The measured model, but a windowed layer costs a tenth of a full one: on stories260K at depth 256 the
        timed difference is noise, and a --speedup 1.01 plan could read as out of reach."""
        model = measure(*args, **kwargs)
        return dataclasses.replace(model, windowed={kind: {depth: seconds / 10 for depth, seconds in by_depth.items()}
                                                    for kind, by_depth in model.attention.items()})

    monkeypatch.setattr(budget_module, "measure_speed_model", steady)
    out, report = tmp_path / "frontier", tmp_path / "frontier.json"
    args = ["frontier", stories260k, "--text", tinystories, "--out", out, "--speedups", "1.01", "--depth", "256",
            "--window", "64", "--ctx", "128", "--chunks", "2", "--reps", "1", "--threads", "1", "--json", report]
    done = run_cli_here(*args)
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    kinds = [point["variant"]["kind"] for point in data["points"]]
    assert kinds == ["base", "drop", "window"]  # stories260K's head size of 8 takes no quantized cache
    base = data["points"][0]
    assert base["tg_speedup"] == 1.0 and base["ppl_ratio"] == 1.0
    for point in data["points"]:  # on the frontier exactly when no other point is as fast and as good, and better in one
        beaten = any(o["tg_speedup"] >= point["tg_speedup"] and o["ppl_ratio"] <= point["ppl_ratio"]
                     and (o["tg_speedup"], o["ppl_ratio"]) != (point["tg_speedup"], point["ppl_ratio"]) for o in data["points"])
        assert point["frontier"] is not beaten
    assert gguf_geometry(out / "window-x1.01.gguf").windowed and gguf_geometry(out / "drop-x1.01.gguf").attention_free + \
        gguf_geometry(out / "drop-x1.01.gguf").linear_attention
    for point in data["points"]:  # the table marks the same points
        name = point["variant"]["name"]
        assert f"| {f'**{name}**' if point['frontier'] else name} |" in done.stdout
    again = run_cli_here(*args[:-2])  # everything is reused: the same figures
    assert again.returncode == 0 and again.stdout == done.stdout
