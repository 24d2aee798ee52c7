"""The llama-bench driver: one fresh process per round and model, A B A B, its JSON read back; a failure is one line."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from gatenorm_edge.errors import GatenormError
from gatenorm_edge.harness import llama_bench


def fake_binary(tmp_path: Path, calls: Path) -> Path:
    """A stand-in llama-bench: logs its model and cache type, answers 10 t/s for a.gguf and 15 for b.gguf."""
    script = tmp_path / "llama-bench"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$2 ${{18}}" >> {calls}\n'
        'case "$2" in *a.gguf) rate=10;; *b.gguf) rate=15;; *) echo "error: no such model" >&2; exit 1;; esac\n'
        'echo "[{\\"avg_ts\\": $rate, \\"n_gen\\": $6, \\"n_depth\\": $8}]"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_rounds_interleave_fresh_processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls.txt"
    monkeypatch.setattr(llama_bench, "binary", lambda: fake_binary(tmp_path, calls))
    rates = llama_bench.interleaved([(tmp_path / "a.gguf", "f16"), (tmp_path / "b.gguf", "q8_0")], 4096, 32, 3, 2)
    assert rates == [[10.0] * 3, [15.0] * 3]
    order = calls.read_text().split("\n")[:-1]
    assert [Path(line.split()[0]).name for line in order] == ["a.gguf", "b.gguf"] * 3  # A B A B A B
    assert [line.split()[1] for line in order] == ["f16", "q8_0"] * 3  # -ctv, each model's cache type


def test_a_failing_llama_bench_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_bench, "binary", lambda: fake_binary(tmp_path, tmp_path / "calls.txt"))
    with pytest.raises(GatenormError, match="llama-bench failed on c.gguf"):
        llama_bench.tg_rate(tmp_path / "c.gguf", "f16", 0, 8, 1)


def test_without_cmake_the_build_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path))
    monkeypatch.setattr(llama_bench.shutil, "which", lambda name: None)
    with pytest.raises(GatenormError, match="needs cmake"):
        llama_bench.binary()
