"""Caches that cannot lie: a calibration, fitted-patch, speed-model or zero-shot entry that is truncated,
bit-flipped or written by another version is detected, reported in one line, removed and rebuilt; never trusted."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gatenorm_edge.cache import PROGRAM, DamagedEntry, seal, unseal
from gatenorm_edge.harness import zeroshot as zs
from gatenorm_edge.harness.model import open_model
from gatenorm_edge.harness.selfcal import CalibrationSpec, self_calibration
from gatenorm_edge.harness.speed import BenchSettings
from gatenorm_edge.selfprune import SelfCalibratedPruner
from gatenorm_edge.speedmodel import measure_speed_model

Damage = Callable[[str], str]


def flip_one_bit(text: str) -> str:
    """One bit of one digit flipped, deep inside the payload (0 <-> 1, 2 <-> 3, ...)."""
    position = max(i for i, char in enumerate(text[: len(text) * 3 // 4]) if char.isdigit())
    return text[:position] + chr(ord(text[position]) ^ 1) + text[position + 1 :]


DAMAGES: list[tuple[Damage, str]] = [
    (lambda text: text[: len(text) // 2], "truncated"),
    (flip_one_bit, "checksum does not match"),
    (lambda text: text.replace(PROGRAM, "gatenorm-edge 0.0.9"), "written by gatenorm-edge 0.0.9"),
]
IDS = ["truncated", "bit-flipped", "other-version"]


def one_warning(err: str, what: str, path: Path, reason: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"warning: {what} cache entry {path} is damaged") and reason in lines[0], lines[0]


@pytest.mark.parametrize(("damage", "reason"), DAMAGES, ids=IDS)
def test_a_sealed_entry_proves_itself(damage: Damage, reason: str) -> None:
    text = seal({"tokens": [1, 2, 3], "seconds": 0.25})
    assert unseal(text) == {"tokens": [1, 2, 3], "seconds": 0.25}
    with pytest.raises(DamagedEntry, match=reason):
        unseal(damage(text))


@pytest.mark.parametrize(("damage", "reason"), DAMAGES, ids=IDS)
def test_a_damaged_calibration_entry_is_sampled_again(
    stories260k: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Damage, reason: str
) -> None:
    with contextlib.closing(open_model(stories260k, n_ctx=64, n_threads=1)) as model:
        spec = CalibrationSpec(source="starts", tokens=4 * 32, seq_len=32)
        first = self_calibration(model, spec, cache_dir=tmp_path)
        (entry,) = tmp_path.glob("*.json")
        entry.write_text(damage(entry.read_text()))
        again = self_calibration(model, spec, cache_dir=tmp_path)
        assert (first.cached, again.cached) == (False, False)  # sampled again, not read back
        assert again.sequences == first.sequences  # the same seed gives the same tokens
        one_warning(capsys.readouterr().err, "calibration", entry, reason)
        assert self_calibration(model, spec, cache_dir=tmp_path).cached  # the rebuilt entry is sound


@pytest.mark.parametrize(("damage", "reason"), DAMAGES, ids=IDS)
def test_a_damaged_speed_model_is_measured_again(
    stories260k: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Damage, reason: str
) -> None:
    settings = BenchSettings(prompt=16, gen=2, depths=(0,), reps=1, threads=1)
    first = measure_speed_model(stories260k, settings, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.json")
    entry.write_text(damage(entry.read_text()))
    again = measure_speed_model(stories260k, settings, cache_dir=tmp_path)
    assert again.seconds != first.seconds  # measured anew: a new run takes its own time
    one_warning(capsys.readouterr().err, "speed-model", entry, reason)
    assert measure_speed_model(stories260k, settings, cache_dir=tmp_path) == again  # and cached soundly


def sealed_row(index: int, gold: int, lls: list[float]) -> str:
    return seal({"index": index, "gold": gold, "lls": lls, "seconds": 0.5, "cpu_seconds": 0.5})


@pytest.mark.parametrize(
    ("damage", "reason"),
    [*DAMAGES, (lambda line: sealed_row(0, 1, [0.0, 0.0]), "does not match the data")],
    ids=[*IDS, "contradicts-data"],
)
def test_damaged_zeroshot_rows_are_dropped_reported_and_computed_again(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Damage, reason: str
) -> None:
    examples = zs.load_task("arc_easy", tiny_data)
    good = [sealed_row(e.index, e.gold, [-1.0] * len(e.requests)) for e in examples[:3]]
    path = tmp_path / "rows.jsonl"
    path.write_text(f"{good[0]}\n{damage(good[1])}\n{good[2]}\n", encoding="utf-8")
    results = zs.ResultsFile(path, examples)
    results.close()
    assert sorted(results.done) == [examples[0].index, examples[2].index]  # the damaged one is computed again
    one_warning(capsys.readouterr().err, "zero-shot", path, reason)
    assert path.read_text(encoding="utf-8") == f"{good[0]}\n{good[2]}\n"  # the file keeps only sound rows


@pytest.mark.parametrize(("damage", "reason"), DAMAGES, ids=IDS)
def test_damaged_fitted_patches_are_fitted_again(stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], damage: Damage, reason: str) -> None:
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path))
    spec = CalibrationSpec(source="starts", tokens=8 * 48, seq_len=48)
    with contextlib.closing(SelfCalibratedPruner(stories260k, spec=spec, n_threads=1)) as first:
        patches = dict(first.patches)
    (manifest,) = (tmp_path / "fits").glob("*.npz.json")
    with contextlib.closing(SelfCalibratedPruner(stories260k, spec=spec, n_threads=1)) as warm:
        assert "fits_from_cache" in warm.seconds and warm.patches.keys() == patches.keys()
        assert all(np.array_equal(warm.patches[layer], patches[layer]) for layer in patches)
    manifest.write_text(damage(manifest.read_text()))
    capsys.readouterr()
    with contextlib.closing(SelfCalibratedPruner(stories260k, spec=spec, n_threads=1)) as again:
        assert "fits_from_cache" not in again.seconds and "patch" in again.seconds  # fitted anew
    one_warning(capsys.readouterr().err, "patch-fit", manifest, reason)


def test_patches_whose_arrays_changed_are_fitted_again(stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path))
    spec = CalibrationSpec(source="starts", tokens=8 * 48, seq_len=48)
    SelfCalibratedPruner(stories260k, spec=spec, n_threads=1).close()
    (arrays,) = (tmp_path / "fits").glob("*.npz")
    data = bytearray(arrays.read_bytes())
    data[len(data) // 2] ^= 1
    arrays.write_bytes(bytes(data))
    capsys.readouterr()
    with contextlib.closing(SelfCalibratedPruner(stories260k, spec=spec, n_threads=1)) as again:
        assert "fits_from_cache" not in again.seconds
    one_warning(capsys.readouterr().err, "patch-fit", arrays, "arrays do not match their checksum")


def test_an_entry_keyed_by_layer_numbers_proves_itself_when_read_back() -> None:
    """JSON turns integer keys into strings, whose order differs from ten up (the fitted patches' manifest)."""
    payload = {layer: {"ridge": 0.1 * layer} for layer in (2, 9, 10, 29)}
    assert unseal(seal(payload)) == {str(layer): value for layer, value in payload.items()}
