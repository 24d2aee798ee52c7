"""llama.cpp's native code: make install's probe and its rebuild without AMX, and one line for a native crash."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gatenorm_edge.errors import GatenormError
from gatenorm_edge.native import (
    NO_AMX_FLAGS, PROBE_MODEL, BuildRecord, describe_death, ensure_llama_runs, probe_command, run_probe,
)

from cli_helpers import run_cli


def stand_in_probe(marker: Path, signum: int = signal.SIGILL) -> list[str]:
    """A probe that reports an AMX build and dies of ``signum`` until ``marker`` exists (the 'rebuilt' llama.cpp),
    then reports a build without AMX that passes."""
    code = (
        "import os, signal, sys\n"
        f"if not os.path.exists({str(marker)!r}):\n"
        "    print('CPU : AVX512 = 1 | AMX_INT8 = 1 |', flush=True)\n"
        f"    os.kill(os.getpid(), {int(signum)})\n"
        "print('CPU : AVX512 = 1 |')\nprint('probe passed')\n"
    )
    return [sys.executable, "-c", code]


def test_a_probe_dying_of_sigill_rebuilds_once_without_amx_and_records_it(tmp_path: Path) -> None:
    marker, record = tmp_path / "rebuilt", tmp_path / "record.json"
    rebuilds: list[str] = []
    said: list[str] = []

    def rebuild(cmake_args: str) -> None:
        rebuilds.append(cmake_args)
        marker.touch()

    result = ensure_llama_runs(stand_in_probe(marker), record=record, rebuild=rebuild, say=said.append)
    assert len(rebuilds) == 1
    assert f"-DCMAKE_C_FLAGS='{NO_AMX_FLAGS}'" in rebuilds[0] and f"-DCMAKE_CXX_FLAGS='{NO_AMX_FLAGS}'" in rebuilds[0]
    assert len(said) == 2 and "\n" not in said[0]
    assert "died of SIGILL (illegal instruction)" in said[0] and "rebuilding it with AMX off" in said[0]
    assert result == BuildRecord.read(record) and result.cmake_args == rebuilds[0] and not result.amx

    def no_rebuild(cmake_args: str) -> None:
        raise AssertionError("a rerun must not rebuild")

    again = ensure_llama_runs(stand_in_probe(marker), record=record, rebuild=no_rebuild, say=said.append)
    assert again == result  # the recorded flags are kept


def test_a_crash_without_amx_is_not_rebuilt_but_reported(tmp_path: Path) -> None:
    code = "import os, signal\nprint('CPU : AVX2 = 1 |', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)\n"

    def rebuild(cmake_args: str) -> None:
        raise AssertionError("rebuilding without AMX cannot help a build without AMX")

    with pytest.raises(GatenormError, match=r"cannot decode a batch on this CPU: SIGSEGV \(segmentation fault\)"):
        ensure_llama_runs([sys.executable, "-c", code], record=tmp_path / "r.json", rebuild=rebuild, say=print)
    assert not (tmp_path / "r.json").exists()


def test_a_rebuild_that_still_dies_is_an_error(tmp_path: Path) -> None:
    rebuilds: list[str] = []
    with pytest.raises(GatenormError, match="SIGBUS"):
        ensure_llama_runs(stand_in_probe(tmp_path / "never", signal.SIGBUS), record=tmp_path / "r.json",
                          rebuild=rebuilds.append, say=lambda line: None)
    assert len(rebuilds) == 1


def test_the_real_probe_passes_on_the_installed_llama_cpp() -> None:
    # make install has already made the installed build pass; the probe model holds Q8_0 matrices
    outcome = run_probe(probe_command(PROBE_MODEL))
    assert outcome.passed, outcome.output


def crash_after_watching(kill: str) -> subprocess.CompletedProcess[str]:
    code = f"from gatenorm_edge.native import report_native_crashes\nreport_native_crashes('gatenorm-edge test')\n{kill}\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("kill", "signum", "fragment"),
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGILL)", signal.SIGILL, "the CPU refused an instruction"),
        ("import ctypes; ctypes.string_at(0)", signal.SIGSEGV, "in native code (called from"),
    ],
)
def test_a_native_crash_is_one_error_line(kill: str, signum: int, fragment: str) -> None:
    done = crash_after_watching(kill)
    assert done.returncode == -signum
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gatenorm-edge test died of "), done.stderr
    assert signal.Signals(signum).name in lines[0] and fragment in lines[0]
    if signum == signal.SIGILL:
        assert "make install" in lines[0] and NO_AMX_FLAGS in lines[0]


def test_a_command_dying_in_native_code_says_so_in_one_line(stories260k: Path) -> None:
    prelude = "import ctypes\nimport gatenorm_edge.harness.perplexity as p\np.perplexity = lambda *a, **k: ctypes.string_at(0)"
    done = run_cli("ppl", stories260k, "--text", stories260k, prelude=prelude)
    assert done.returncode == -signal.SIGSEGV
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: gatenorm-edge ppl died of SIGSEGV (segmentation fault)")


def test_a_clean_exit_prints_nothing_more() -> None:
    done = crash_after_watching("print('done')")
    assert (done.returncode, done.stdout, done.stderr) == (0, "done\n", "")


def test_a_dead_worker_is_described_by_its_signal() -> None:
    assert describe_death("bench worker", -signal.SIGILL).startswith("bench worker died of SIGILL (illegal instruction)")
    assert describe_death("bench worker", 3) == "bench worker died (exit status 3)"
