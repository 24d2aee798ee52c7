"""Pruning to a budget: sizes parsed, the speed model's arithmetic, the KV budget met with the fewest layers
(checked against llama.cpp's own KV allocation), the KLD budget, and one-line refusals."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, run_cli_here
from gatenorm_edge.budget import Budget, parse_size, plan_to_budget
from gatenorm_edge.cache import unseal
from gatenorm_edge.chooser import template
from gatenorm_edge.errors import GatenormError
from gatenorm_edge.harness.model import open_model
from gatenorm_edge.harness.speed import BenchResult, BenchSettings, Spread
from gatenorm_edge.selfprune import SelfCalibratedPruner
from gatenorm_edge.speedmodel import Change, SpeedModel, measure_speed_model, speed_settings


@pytest.mark.parametrize(("text", "size"), [("1000", 1000), ("512M", 512 * 2**20), ("8GiB", 8 * 2**30), ("1.5k", 1536), ("2 MB", 2 * 2**20)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_size_refuses_words() -> None:
    with pytest.raises(GatenormError, match="512M or 8GiB"):
        parse_size("lots")


def per_depth(tg: float) -> dict[str, dict[str, float]]:
    return {"tg": {"4096": tg}, "pp": {"4096": tg / 10}}


def test_speed_model_is_linear_in_layers_removed() -> None:
    base, attention, patch, windowed, base_q8 = 0.010, 0.0005, 0.0001, 0.0002, 0.006
    model = SpeedModel("m.gguf", "0" * 64, "cpu", 2, True, [4096], 10, per_depth(base), per_depth(attention),
                       per_depth(patch), 1.0, window=512, windowed=per_depth(windowed),
                       unchanged={"f16": per_depth(base), "q8_0": per_depth(base_q8)})
    assert model.speedup("tg", 4096, Change()) == 1.0
    assert model.speedup("tg", 4096, Change(dropped=(1, 2, 3, 4))) == pytest.approx(base / (base - 4 * attention))
    two_and_two = Change(dropped=(1, 2), patched=(3, 4))
    assert model.speedup("tg", 4096, two_and_two) == pytest.approx(base / (base - 4 * attention + 2 * patch))
    three = Change(windowed=(1, 2, 3), window=512)
    assert model.speedup("tg", 4096, three) == pytest.approx(base / (base - 3 * (attention - windowed)))
    assert model.speedup("tg", 4096, Change(cache_type="q8_0")) == pytest.approx(base / base_q8)  # the cache alone
    with pytest.raises(GatenormError, match="measured at depths"):
        model.speedup("tg", 0, Change(dropped=(1,)))
    with pytest.raises(GatenormError, match="not q8_0"):  # drops with q8_0 were not timed by this f16 model
        model.speedup("tg", 4096, Change(dropped=(1,), cache_type="q8_0"))
    with pytest.raises(GatenormError, match="and 256"):
        model.speedup("tg", 4096, Change(windowed=(1,), window=256))


def test_a_quantized_cache_that_meets_the_target_alone_is_said_in_one_line(smollm2: Path) -> None:
    f16, q8, q4 = (Change(cache_type=kind).kv_bytes(smollm2, 4096) for kind in ("f16", "q8_0", "q4_0"))
    assert q4 < q8 < f16
    note = Budget(kv_budget=q8, ctx=4096).cache_alone(smollm2, None)
    assert note == (f"note: a q8_0 KV cache alone fits 4096 tokens in {q8:,} bytes, no layer changed: run llama.cpp with "
                    f"-ctk q8_0 -ctv q8_0; check its perplexity first: gatenorm-edge ppl {smollm2.name} --text FILE "
                    "--cache-type q8_0")
    smaller = Budget(kv_budget=q8 - 1, ctx=4096).cache_alone(smollm2, None)
    assert smaller is not None and smaller.startswith(f"note: a q4_0 KV cache alone fits 4096 tokens in {q4:,} bytes")
    assert Budget(kv_budget=q4 - 1, ctx=4096).cache_alone(smollm2, None) is None
    speed = SpeedModel(smollm2.name, "0" * 64, "cpu", 2, True, [4096], 10, per_depth(0.010), per_depth(0.0005),
                       per_depth(0.0001), 1.0, unchanged={"f16": per_depth(0.010), "q8_0": per_depth(0.006)})
    note = Budget(speedup=1.6, depth=4096).cache_alone(smollm2, speed)
    assert note is not None and note.startswith("note: a q8_0 KV cache alone is predicted to give 1.667x tg at depth 4096")
    assert "-ctk q8_0 -ctv q8_0; check its perplexity first" in note and "\n" not in note
    assert Budget(speedup=1.7, depth=4096).cache_alone(smollm2, speed) is None  # q4_0 was not timed: no claim for it


def test_speed_model_is_measured_once_and_cached(stories260k: Path, tmp_path: Path) -> None:
    settings = BenchSettings(prompt=32, gen=4, depths=(64,), reps=1, threads=1)
    first = measure_speed_model(stories260k, settings, cache_dir=tmp_path)
    assert first.removed_in_probe == 3 and first.depths == [64]
    assert all(first.base[kind]["64"] > 0 for kind in ("pp", "tg"))
    (entry,) = tmp_path.iterdir()
    assert SpeedModel(**unseal(entry.read_text())) == first
    assert measure_speed_model(stories260k, settings, cache_dir=tmp_path) == first  # from the cache: same figures
    with pytest.raises(GatenormError, match="unpruned model"):
        pruned = tmp_path / "p.gguf"
        run_cli_here("prune", stories260k, pruned, "--layers", "2")
        measure_speed_model(pruned, settings, cache_dir=tmp_path)


def test_kv_budget_takes_the_fewest_layers_and_llama_cpp_agrees(stories260k: Path, tmp_path: Path) -> None:
    # stories260K: 5 layers, 4 KV heads of 8, F16 K and V: 128 bytes per layer per token, 32,768 at 256 tokens
    out, report = tmp_path / "kv.gguf", tmp_path / "kv.json"
    done = run_cli_here("prune", stories260k, out, "--kv-budget", "100000", "--ctx", "256", "--json", report)
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    assert len(data["selfprune"]["layers"]) == 2  # 3 layers x 32,768 <= 100,000 < 4 x 32,768
    assert data["predicted"] == {"depth": 256, "cache_type": "f16", "kv_bytes": 3 * 32768}
    with contextlib.closing(open_model(out, n_ctx=256)) as model:
        assert model.kv_bytes == 3 * 32768  # what llama.cpp allocated for the written file


def test_max_kld_takes_the_most_layers_within_the_limit(stories260k: Path) -> None:
    with contextlib.closing(SelfCalibratedPruner(stories260k, n_threads=1)) as pruner:
        klds = {k: min(c.kld for c in pruner.plan(k).candidates) for k in (1, 2, 3)}
        limit = (klds[1] + klds[2]) / 2 if klds[2] > klds[1] else klds[2] * 1.01
        report, entry = plan_to_budget(stories260k, Budget(max_kld=limit), pruner.plan, None, 3, template("auto", None, "f16"))
    assert report.held_out_kld == min(c.kld for c in report.candidates) <= limit
    assert len(report.layers) == max(k for k, kld in klds.items() if kld <= limit and all(klds[j] <= limit for j in range(1, k)))
    assert entry["depth"] == 4096 and entry["kv_bytes"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--speedup", "1.2", "--count", "2"], "without --count"),
        (["--speedup", "1.2", "--layers", "2"], "without --layers"),
        (["--speedup", "1.2", "--kv-budget", "1M", "--ctx", "64"], "one target"),
        (["--speedup", "0.8"], "above 1"),
        (["--speedup", "1.2", "--depth", "100000"], "--depth 100000 is too deep for stories260K.gguf's training context"),
        (["--speedup", "1.2", "--depth", "2000"], "--depth can be at most 1792"),
        (["--speedup", "1.2", "--depth", "-1"], "--depth must be 0 or more"),
        (["--kv-budget", "1M"], "needs --ctx"),
        (["--kv-budget", "10", "--ctx", "256"], "out of reach"),
        (["--kv-budget", "lots", "--ctx", "256"], "512M or 8GiB"),
        (["--max-kld", "0"], "must be positive"),
        (["--speedup", "1.2", "--criterion", "per-head"], "data-free default's order"),
    ],
)
def test_bad_targets_are_one_line_and_write_nothing(stories260k: Path, tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out.gguf"
    assert_one_line_error(run_cli_here("prune", stories260k, out, *args), message)
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--speedup", "50", "--depth", "64", "--mode", "auto"], "--speedup 50.0 is out of reach: removing 3 layers is predicted to give"),
        (["--speedup", "50", "--depth", "64"], "--speedup 50.0 is out of reach: windowing 4 layers is predicted to give"),  # the default
        (["--max-kld", "1e-12"], "--max-kld 1e-12 is out of reach: removing one layer already gives a held-out KLD of"),
    ],
)
def test_an_unreachable_target_states_the_best_reachable_and_writes_nothing(
    stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out.gguf"
    done = run_cli_here("prune", stories260k, out, *args)
    # Found only after measuring (the speed model, the calibration): their progress lines come first.
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and done.stderr.rstrip().endswith(errors[0]), done.stderr
    line = errors[0]
    assert message in line, line
    assert re.search(r"\d\.\d{3}x|of \d", line), line  # the best reachable value, as a number
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "cache"]


def test_bench_vs_shows_the_prediction_beside_the_measurement(stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path / "cache"))
    speed = measure_speed_model(stories260k, BenchSettings(prompt=32, gen=4, depths=(64,), reps=1, threads=1))
    pruned, out = tmp_path / "p.gguf", tmp_path / "b.json"
    assert run_cli_here("prune", stories260k, pruned, "--layers", "2,3").returncode == 0
    done = run_cli_here("bench", stories260k, "--vs", pruned, "--prompt", "32", "--gen", "4", "--depth", "64",
                        "--reps", "1", "--threads", "1", "--json", out)
    assert done.returncode == 0, done.stderr
    predicted = json.loads(out.read_text())["predicted"]
    assert predicted["tg"]["64"] == pytest.approx(speed.speedup("tg", 64, Change(dropped=(2, 3))))
    assert "(predicted " in done.stdout
    done = run_cli_here("bench", stories260k, "--vs", pruned, "--prompt", "32", "--gen", "4", "--depth", "0",
                        "--reps", "1", "--threads", "1", "--json", out)
    assert json.loads(out.read_text())["predicted"] is None  # no speed model at depth 0: no prediction shown


def test_budget_reuses_a_speed_model_that_covers_its_depth(stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path / "cache"))
    earlier = measure_speed_model(stories260k, BenchSettings(prompt=32, gen=4, depths=(0, 64), reps=1, threads=1))

    def measure_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached speed model covers depth 64: nothing to measure")

    monkeypatch.setattr("gatenorm_edge.budget.measure_speed_model", measure_again)
    budget = Budget(speedup=1.01, depth=64, threads=1)
    assert budget.speed_model(stories260k, 3, template("auto", None, "f16"), progress=False) == earlier


def test_speed_settings_cut_the_deepest_depth_to_the_training_context(stories260k: Path) -> None:
    # stories260K: a 2048-token training context; the speed model times 256 prompt tokens after the depth
    assert speed_settings(stories260k, (0, 128, 4096)).depths == (0, 128, 1792)


def test_bench_ratio_is_the_median_of_round_by_round_ratios() -> None:
    def spread(*values: float) -> Spread:
        return Spread.of(list(values))

    rates = {"a": {"0": spread(10.0, 20.0, 30.0)}, "b": {"0": spread(11.0, 26.0, 30.0)}}
    result = BenchResult(["a", "b"], [0], 1, 1, 3, 1, 1, True, rates, rates, {}, {}, {}, {}, {}, 0.0)
    assert result.ratio("tg", 0, "b") == pytest.approx(1.1)  # rounds: 1.1, 1.3, 1.0
