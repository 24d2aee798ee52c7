"""The data-free default (`prune --count K`): residual-stream edits in llama.cpp, self-sampled calibration,
patches kept only where they beat a drop, provenance, and the whole path through the CLI."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from cli_helpers import assert_one_line_error, finish, run_cli, run_cli_here, spawn_cli
from gatenorm_edge.errors import GatenormError
from gatenorm_edge.harness.model import open_model
from gatenorm_edge.harness.probe import StreamEdits, StreamProbe
from gatenorm_edge.harness.selfcal import CalibrationSpec, Capture, sample_sequences, self_calibration
from gatenorm_edge.rewrite import prune_gguf
from gatenorm_edge.options import DEFAULT_SELF_TOKENS
from gatenorm_edge.patches import (
    LeastSquares, StreamStatistics, best_patch, capture_statistics, recovered_edits, split_sequences,
)
from gatenorm_edge.selfprune import SelfCalibratedPruner
from gatenorm_edge.sources.gguf_file import GGUFFile


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test samples into its own cache folder (the CLI subprocesses inherit it)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GATENORM_CACHE", str(cache))
    return cache


def probe_logits(model_path: Path, sequence: np.ndarray, edits: StreamEdits) -> np.ndarray:
    with contextlib.closing(open_model(model_path, n_ctx=64, n_threads=1)) as model:
        probe = StreamProbe(model, len(sequence))
        try:
            rows: list[np.ndarray] = []
            probe.run([sequence], edits, lambda _i, logits: rows.append(logits))
            return rows[0]
        finally:
            probe.close()


def file_logits(path: Path, sequence: np.ndarray) -> np.ndarray:
    with contextlib.closing(open_model(path, n_ctx=64, n_threads=1)) as model:
        return model.logits(sequence, output_from=0)


@pytest.mark.parametrize("mode", ["drop", "patch"])
def test_stream_edits_equal_the_rewritten_file(stories260k: Path, tmp_path: Path, mode: str) -> None:
    """Dropping or patching layers inside llama.cpp gives the logits of the file `prune` writes for them."""
    sequence = np.array([1, *range(40, 100)], dtype=np.int64)
    rng = np.random.default_rng(3)
    patches = {layer: (rng.standard_normal((64, 64)) * 0.05).astype(np.float32) for layer in (2, 4)}
    out = tmp_path / "edited.gguf"
    if mode == "drop":
        edits = StreamEdits(drop=frozenset(patches))
        prune_gguf(stories260k, out, sorted(patches))
    else:
        edits = StreamEdits(patch=patches)
        prune_gguf(stories260k, out, sorted(patches), linear_maps=patches.__getitem__)
    edited, written = probe_logits(stories260k, sequence, edits), file_logits(out, sequence)
    base = file_logits(stories260k, sequence)
    assert np.abs(edited - base).max() > 0.1  # the edit changes the model
    # ggml's and NumPy's float32 sums run in a different order, and ggml's order follows the host's SIMD
    # (2.6e-4 apart on an AVX2 host); a wrong edit is off by more than 0.1, as the line above checks.
    np.testing.assert_allclose(edited, written, atol=1e-3, rtol=0)


def test_capture_sees_the_attention_output(stories260k: Path) -> None:
    """Captured (x, attn_norm(x), attention) satisfy the definitions: norm from x, and patching with W = 0 is a drop."""
    sequence = np.array([1, *range(40, 80)], dtype=np.int64)
    seen: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    edits = StreamEdits(capture=frozenset([3]), on_capture=lambda layer, x, n, a: seen.setdefault(layer, (x, n, a)))
    probe_logits(stories260k, sequence, edits)
    x, normed, attention = seen[3]
    gain = GGUFFile(stories260k).tensor("blk.3.attn_norm.weight")
    expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1, keepdims=True) + 1e-5) * gain
    np.testing.assert_allclose(normed, expected, atol=1e-4)
    assert np.abs(attention).max() > 1e-3
    zero = probe_logits(stories260k, sequence, StreamEdits(patch={3: np.zeros((64, 64), np.float32)}))
    dropped = probe_logits(stories260k, sequence, StreamEdits(drop=frozenset([3])))
    np.testing.assert_array_equal(zero, dropped)


def test_sampling_is_reproducible_for_a_seed(stories260k: Path, tmp_path: Path) -> None:
    with contextlib.closing(open_model(stories260k, n_ctx=64, n_threads=1)) as model:
        prompts = [model.tokenize_text(text) for text in ("Once upon a time", "The dog")]
        first = sample_sequences(model, prompts, 48, seed=5)
        again = sample_sequences(model, prompts, 48, seed=5)
        other = sample_sequences(model, prompts, 48, seed=6)
        assert first == again
        assert first.sequences != other.sequences
        assert [len(s) for s in first.sequences] == [48, 48]
        spec = CalibrationSpec(source="starts", tokens=2 * 48, seq_len=48, seed=5)
        sampled = self_calibration(model, spec, cache_dir=tmp_path)
        cached = self_calibration(model, spec, cache_dir=tmp_path)
    assert sampled.sequences[0][: len(prompts[0])] == tuple(prompts[0])  # the first start text, as prompted
    assert sampled.sequences == cached.sequences and len(sampled.sequences) == 2
    assert (sampled.cached, cached.cached) == (False, True)
    assert sampled.sha256 == cached.sha256


def test_least_squares_statistics_match_a_dense_computation() -> None:
    rng = np.random.default_rng(0)
    n = rng.standard_normal((50, 6))
    y = n @ rng.standard_normal((6, 6)) + 0.1 * rng.standard_normal((50, 6))
    stats = LeastSquares.empty(6)
    stats.add(n[:20], y[:20])
    stats.add(n[20:], y[20:])
    w = rng.standard_normal((6, 6))
    dense = np.sum((y - n @ w.T) ** 2) / np.sum(y**2)
    assert stats.relative_error(w) == pytest.approx(dense, rel=1e-10)
    assert stats.relative_error(np.zeros((6, 6))) == pytest.approx(1.0)


def test_a_patch_that_hurts_held_out_text_is_not_kept() -> None:
    """Fitted where attention is A·n, validated where it is -A·n: the best patch loses to a drop (error > 1)."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((8, 8))
    fit, held, same = LeastSquares.empty(8), LeastSquares.empty(8), LeastSquares.empty(8)
    for stats, sign in ((fit, 1.0), (held, -1.0), (same, 1.0)):
        n = rng.standard_normal((200, 8))
        stats.add(n, sign * n @ a.T)
    assert best_patch(fit, held)[1] > 1.0
    assert best_patch(fit, same)[1] < 0.01


@pytest.mark.slow
def test_guard_drops_patches_that_hurt(stories260k: Path) -> None:
    """Patches made harmful on purpose lose to the plain drop on held-out tokens, so none is written; and
    of the candidate sets (self-calibrated, per-head Gate-Norm) the one with the lowest held-out KLD wins."""
    with contextlib.closing(SelfCalibratedPruner(stories260k, n_threads=1)) as pruner:
        report = pruner.plan(2)
        kept = report.patches
        for layer in report.patched:
            assert pruner.choices[layer].held_error < 1.0
        picked = next(c for c in report.candidates if c.name == report.picked)
        assert picked.kld == min(c.kld for c in report.candidates)
        assert (picked.layers, picked.patched, sorted(kept)) == (report.layers, report.patched, report.patched)
        if picked.patched:
            assert picked.kld_patched < picked.kld_dropped
        pruner.patches = {layer: -5.0 * matrix for layer, matrix in pruner.patches.items()}
        for layer in pruner.prunable:
            pruner.patches.setdefault(layer, np.eye(64) * 5.0)
        harmful = pruner.plan(2)
        kept = harmful.patches
    for candidate in harmful.candidates:
        assert candidate.kld_patched > candidate.kld_dropped and candidate.patched == []
    assert harmful.patched == [] and kept == {}


def metadata(path: Path) -> dict[str, object]:
    """The gatenorm.* fields of a GGUF, read with the upstream gguf package."""
    return {name: field.contents() for name, field in GGUFReader(path).fields.items() if name.startswith("gatenorm.")}


@pytest.mark.slow
def test_default_prune_through_the_cli_records_its_calibration(stories260k: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "pruned.gguf", tmp_path / "prune.json"
    result = run_cli("prune", stories260k, out, "--count", "2", "--json", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    selfprune = data["selfprune"]
    calibration = selfprune["calibration"]
    assert calibration["source"] == "self-sampled" and calibration["tokens"] == DEFAULT_SELF_TOKENS
    stored = metadata(out)
    assert stored["gatenorm.calibration.source"] == "self-sampled"
    assert stored["gatenorm.calibration.sha256"] == calibration["sha256"]
    assert stored["gatenorm.calibration.tokens"] == str(calibration["tokens"])
    heads = GGUFFile(out).arch_value("attention.head_count")
    kv_heads = GGUFFile(out).arch_value("attention.head_count_kv")
    removed = [i for i in range(5) if kv_heads[i] == 0]
    assert removed == selfprune["layers"] and len(removed) == 2
    assert [i for i in removed if heads[i] > 0] == selfprune["patched"]
    for step in ("1/5", "2/5", "3/5", "4/5", "5/5"):
        assert step in result.stderr


@pytest.mark.slow
def test_default_prune_on_smollm2(smollm2: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "smol.gguf", tmp_path / "smol.json"
    result = run_cli("prune", smollm2, out, "--count", "2", "--json", report)
    assert result.returncode == 0, result.stderr
    selfprune = json.loads(report.read_text())["selfprune"]
    assert 1 not in selfprune["layers"]  # the model's critical layer (docs/study.md) is never taken
    assert min(c["kld"] for c in selfprune["candidates"]) > 0
    with contextlib.closing(open_model(out, n_ctx=64)) as model:
        assert np.isfinite(model.logits(model.tokenize_text("The cat sat on the mat."))).all()


@pytest.mark.parametrize("target", [(), ("--speedup", "1.1", "--depth", "512")])
def test_prune_threads_reach_the_pipeline_and_the_speed_model(
    stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: tuple[str, ...]
) -> None:
    seen: dict[str, object] = {}

    def stop(*args: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise GatenormError("stopped before any work")

    monkeypatch.setattr("gatenorm_edge.chooser.prune_model", stop)
    count = () if target else ("--count", "2")
    result = run_cli_here("prune", stories260k, tmp_path / "p.gguf", *count, *target, "--threads", "1")
    assert_one_line_error(result, "stopped before any work")
    assert seen["n_threads"] == 1
    assert (seen["budget"].threads == 1) if target else seen["budget"] is None  # type: ignore[attr-defined]
    assert_one_line_error(run_cli_here("prune", stories260k, tmp_path / "p.gguf", "--count", "2", "--threads", "0"),
                          "--threads")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_old_default_is_one_flag_away(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "old.gguf"
    result = run_cli_here("prune", stories260k, out, "--count", "2", "--criterion", "per-head", "--mode", "drop")
    assert result.returncode == 0, result.stderr
    from gatenorm_edge.scoring import score_model

    order = score_model(stories260k, "per-head").prune_order[:2]
    assert GGUFFile(out).arch_value("attention.head_count_kv") == [0 if i in order else 4 for i in range(5)]
    assert "calibration.source" not in " ".join(metadata(out))


def degenerate_copy(stories260k: Path, path: Path) -> Path:
    """stories260K rewired so every position predicts end-of-sequence with near certainty."""
    shutil.copyfile(stories260k, path)
    reader = GGUFReader(path, "r+")
    tensors = {tensor.name: tensor.data for tensor in reader.tensors}
    tensors["token_embd.weight"][:] = 1.0
    for name, data in tensors.items():
        if name.endswith(("attn_output.weight", "ffn_down.weight")):
            data[:] = 0.0
    tensors["output_norm.weight"][:] = 1.0
    tensors["output.weight"][:] = 0.0
    tensors["output.weight"][2] = 1.0  # token 2 is </s>
    del reader
    return path


@pytest.mark.parametrize("case", ["not-utf8", "too-short", "degenerate", "self-with-linear", "too-many", "deci"])
def test_bad_calibration_input_is_one_line(stories260k: Path, tmp_path: Path, case: str) -> None:
    out, model, extra, count = tmp_path / "out.gguf", stories260k, [], "2"
    if case == "not-utf8":
        bad = tmp_path / "bad.txt"
        bad.write_bytes(b"some text \xff\xfe more")
        extra, message = ["--calib", str(bad)], "not UTF-8"
    elif case == "too-short":
        short = tmp_path / "short.txt"
        short.write_text("Once upon a time there was a cat.\n")
        extra, message = ["--calib", str(short)], "give a longer text"
    elif case == "degenerate":
        model, message = degenerate_copy(stories260k, tmp_path / "eos.gguf"), "degenerate"
    elif case == "too-many":
        count, message = "4", "--count must be between 1 and 3"
    elif case == "deci":
        model = tmp_path / "pruned.gguf"
        prune_gguf(stories260k, model, [2])
        message = "not deci; choose layers with --layers or --criterion per-head"
    else:
        extra, message = ["--mode", "linear", "--calib", str(stories260k)], "--criterion self goes with --mode auto, drop or window"
    result = run_cli("prune", model, out, "--count", count, *extra)
    assert_one_line_error(result, message)
    assert result.returncode == 2
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_default_prune_leaves_nothing_half_written(
    smollm2: Path, tmp_path: Path, private_cache: Path, signal_number: int
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "pruned.gguf"
    process = spawn_cli("prune", smollm2, out, "--count", "2")
    time.sleep(4.0)  # inside sampling: the whole run takes a minute or more on SmolLM2
    process.send_signal(signal_number)
    finish(process, 120)
    assert process.returncode == 130
    assert list(folder.iterdir()) == []
    for entry in private_cache.rglob("*"):
        if entry.is_file():
            assert not entry.name.startswith("."), entry  # no temporary file left
            json.loads(entry.read_text())  # every entry is whole


def test_repetitive_samples_are_refused() -> None:
    from gatenorm_edge.errors import GatenormError
    from gatenorm_edge.harness.selfcal import check_not_repetitive

    varied = [list(range(100)) for _ in range(4)]
    check_not_repetitive(Path("m.gguf"), varied, [0] * 4)
    stuck = [[7] * 100 for _ in range(3)] + varied[:1]
    with pytest.raises(GatenormError, match="3 of 4 sequences repeat"):
        check_not_repetitive(Path("m.gguf"), stuck, [0] * 4)


def test_sequential_patches_fit_the_stream_the_earlier_removals_leave(stories260k: Path) -> None:
    with contextlib.closing(SelfCalibratedPruner(stories260k, n_threads=1)) as pruner:
        layers = [1, 3]
        refit = pruner.sequential_patches(layers, layers)
        np.testing.assert_allclose(refit[1], pruner.patches[1], atol=1e-3)  # nothing upstream of the first: the same fit
        assert not np.array_equal(refit[3], pruner.patches[3])
        sequences = pruner.calibration.arrays()
        fit_ids, held = split_sequences(len(sequences))
        upstream = recovered_edits([1], {1: refit[1]})
        stats = capture_statistics(pruner.probe, sequences, [3], held, 64, lambda **_: None, upstream)
        fit = stats.fit
        # on the stream layer 3 sees once layer 1 is patched, its sequential patch fits at least as well
        assert fit[3].relative_error(refit[3]) <= fit[3].relative_error(pruner.patches[3])


def test_capturing_while_sampling_gives_the_statistics_of_a_second_pass(stories260k: Path) -> None:
    with contextlib.closing(open_model(stories260k, n_ctx=64, n_threads=1)) as model:
        prompts = [model.tokenize_text(text) for text in ("Once upon a time", "The dog", "Lily", "One day, a big")]
        held = [2]
        during = StreamStatistics([1, 3], 64, held)
        samples = sample_sequences(model, prompts, 40, 3, capture=Capture(during.edits(), during.add))
        with contextlib.closing(StreamProbe(model, 40)) as probe:
            after = capture_statistics(probe, [np.asarray(s) for s in samples.sequences], [1, 3], held, 64,
                                       lambda **_: None)
    assert during.tokens == after.tokens == 4 * 40
    for layer in (1, 3):
        for mine, theirs in ((during.fit[layer], after.fit[layer]), (during.held[layer], after.held[layer])):
            np.testing.assert_allclose(mine.gram, theirs.gram, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(mine.cross, theirs.cross, rtol=1e-4, atol=1e-4)
            assert mine.tokens == theirs.tokens > 0
    assert during.cosine() == pytest.approx(after.cosine(), rel=1e-4)
