"""Faults during a run leave no partial output: SIGINT/SIGTERM during prune, score, zeroshot and study,
SIGKILL during a write, two writers racing for the same output, a full disk and a folder that refuses
writes. Each run is slowed or broken at a named function by a prelude, so a signal lands mid-work, after a
marker file says the work has begun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import ROOT, assert_one_line_error, finish, run_cli, spawn_cli

from gatenorm_edge.fileio import PARTIAL_TAG
from gatenorm_edge.inspection import attention_free_layers

INTERRUPTS = [signal.SIGINT, signal.SIGTERM]


def slowed(target: str, delay: float, marker: Path, after: bool = False) -> str:
    """A prelude making ``module:attribute`` (a function or a method) sleep ``delay`` s per call, touching
    ``marker`` once it has been called (``after``: once it has returned)."""
    module, attribute = target.split(":")
    owner, _, name = attribute.rpartition(".")
    holder = f"__import__('importlib').import_module('{module}')" + (f".{owner}" if owner else "")
    return (
        "import functools, pathlib, time, importlib\n"
        f"holder = {holder}\n"
        f"original = getattr(holder, '{name}')\n"
        "@functools.wraps(original)\n"
        "def slowed(*args, **kwargs):\n"
        f"    result = None if {not after} else original(*args, **kwargs)\n"
        f"    pathlib.Path({str(marker)!r}).touch()\n"
        f"    time.sleep({delay})\n"
        f"    return original(*args, **kwargs) if {not after} else result\n"
        f"setattr(holder, '{name}', slowed)\n"
    )


def start(args: list[str | Path], prelude: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return spawn_cli(*args, prelude=prelude, env=env)


def wait_for(marker: Path, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the slowed function was never reached"
        time.sleep(0.05)


def interrupt(process: subprocess.Popen[str], signal_number: int) -> str:
    process.send_signal(signal_number)
    _, stderr = finish(process, 120)
    return stderr


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(f".*.{PARTIAL_TAG}-*"))


@pytest.mark.parametrize("signal_number", INTERRUPTS)
def test_prune_interrupted_leaves_nothing(stories260k: Path, tmp_path: Path, signal_number: int) -> None:
    out, marker = tmp_path / "out" / "pruned.gguf", tmp_path / "started"
    out.parent.mkdir()
    process = start(["prune", stories260k, out, "--layers", "2"], slowed("gatenorm_edge.rewrite:_copy_range", 0.2, marker))
    wait_for(marker, process)
    assert partials(out.parent)  # the write is under way
    stderr = interrupt(process, signal_number)
    assert process.returncode == 130 and stderr.strip() == "interrupted", stderr
    assert list(out.parent.iterdir()) == []


def test_prune_killed_leaves_one_named_partial_that_the_next_run_removes(stories260k: Path, tmp_path: Path) -> None:
    out, marker = tmp_path / "pruned.gguf", tmp_path / "started"
    process = start(["prune", stories260k, out, "--layers", "2"], slowed("gatenorm_edge.rewrite:_copy_range", 0.2, marker))
    wait_for(marker, process)
    interrupt(process, signal.SIGKILL)
    (left,) = partials(tmp_path)
    assert left.name.startswith(f".pruned.gguf.{PARTIAL_TAG}-{process.pid}-") and not out.exists()
    done = run_cli("prune", stories260k, out, "--layers", "2")
    assert done.returncode == 0, done.stderr
    assert partials(tmp_path) == [] and attention_free_layers(out) == [2]


def test_two_writers_of_one_output_never_corrupt_it(stories260k: Path, tmp_path: Path) -> None:
    references = {}
    for layer in ("1", "2"):
        references[layer] = tmp_path / f"reference{layer}.gguf"
        assert run_cli("prune", stories260k, references[layer], "--layers", layer).returncode == 0
    out = tmp_path / "race" / "pruned.gguf"
    out.parent.mkdir()
    writers = [
        start(["prune", stories260k, out, "--layers", layer, "--force"],
              slowed("gatenorm_edge.rewrite:_copy_range", 0.05, tmp_path / f"started{layer}"))
        for layer in ("1", "2")
    ]
    for writer in writers:
        _, stderr = finish(writer, 300)
        assert writer.returncode == 0, stderr
    assert out.read_bytes() in {path.read_bytes() for path in references.values()}
    assert list(out.parent.iterdir()) == [out]


@pytest.mark.parametrize("signal_number", INTERRUPTS)
def test_score_interrupted_writes_no_report(smollm2: Path, tmp_path: Path, signal_number: int) -> None:
    report, marker = tmp_path / "scores.json", tmp_path / "started"
    process = start(["score", smollm2, "--json", report],
                    slowed("gatenorm_edge.sources.gguf_file:GGUFFile.tensor", 0.2, marker))
    wait_for(marker, process)
    interrupt(process, signal_number)
    assert process.returncode == 130 and list(tmp_path.iterdir()) == [marker]


@pytest.mark.parametrize("signal_number", INTERRUPTS)
def test_study_interrupted_leaves_no_report_and_no_work_folder(
    stories260k: Path, tinystories: Path, tmp_path: Path, signal_number: int
) -> None:
    report, marker, scratch = tmp_path / "study.json", tmp_path / "started", tmp_path / "scratch"
    scratch.mkdir()
    process = start(
        ["study", stories260k, "--text", tinystories, "--criteria", "per-head,last", "--counts", "1,2", "--ctx", "64",
         "--chunks", "2", "--threads", "1", "--json", report],
        slowed("gatenorm_edge.evaluation:prune_gguf", 2.0, marker, after=True), env={"TMPDIR": str(scratch)},
    )
    wait_for(marker, process)
    assert any(scratch.iterdir())  # a pruned model sits in the study's work folder
    interrupt(process, signal_number)
    assert process.returncode == 130 and not report.exists() and list(scratch.iterdir()) == []


def test_a_killed_study_work_folder_is_removed_by_the_next_run(stories260k: Path, tinystories: Path, tmp_path: Path) -> None:
    marker, scratch = tmp_path / "started", tmp_path / "scratch"
    scratch.mkdir()
    args = ["study", stories260k, "--text", tinystories, "--criteria", "last", "--counts", "1", "--ctx", "64",
            "--chunks", "2", "--threads", "1"]
    process = start(args, slowed("gatenorm_edge.evaluation:prune_gguf", 5.0, marker, after=True), env={"TMPDIR": str(scratch)})
    wait_for(marker, process)
    interrupt(process, signal.SIGKILL)
    (left,) = scratch.iterdir()
    assert left.name.startswith(f"gatenorm-study-{process.pid}-")
    done = subprocess.run([sys.executable, "-m", "gatenorm_edge", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "TMPDIR": str(scratch)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert list(scratch.iterdir()) == []


def test_zeroshot_interrupted_keeps_whole_rows_and_resumes_to_the_same_result(
    smollm2: Path, tiny_data: Path, tmp_path: Path
) -> None:
    data = tiny_data
    cache, marker = tmp_path / "cache", tmp_path / "started"
    args = ["zeroshot", smollm2, "--tasks", "arc_easy", "--data-dir", data, "--threads", "1", "--cache-dir", cache]
    process = start([*args, "--json", tmp_path / "interrupted.json"],
                    slowed("gatenorm_edge.harness.zeroshot:ResultsFile.add", 3.0, marker, after=True))
    wait_for(marker, process)
    interrupt(process, signal.SIGINT)
    assert process.returncode == 130 and not (tmp_path / "interrupted.json").exists()
    (rows_file,) = cache.rglob("*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert 1 <= len(rows) < 5
    resumed = run_cli(*args, "--json", tmp_path / "resumed.json")
    fresh = run_cli(*args[:-1], tmp_path / "fresh-cache", "--json", tmp_path / "fresh.json")
    assert resumed.returncode == 0 and fresh.returncode == 0, resumed.stderr + fresh.stderr
    accuracy = [json.loads((tmp_path / f"{name}.json").read_text())["tasks"][0]["acc"] for name in ("resumed", "fresh")]
    assert accuracy[0] == accuracy[1]


def failing(target: str, error: str, after_calls: int) -> str:
    """A prelude making ``module:function`` raise ``error`` (a Python expression) from its next call on,
    once it has been called ``after_calls`` times."""
    module, name = target.split(":")
    return (
        "import importlib, errno\n"
        f"holder = importlib.import_module('{module}')\n"
        f"original, calls = getattr(holder, '{name}'), []\n"
        "def failing(*args, **kwargs):\n"
        "    calls.append(1)\n"
        f"    if len(calls) > {after_calls}:\n"
        f"        raise {error}\n"
        "    return original(*args, **kwargs)\n"
        f"setattr(holder, '{name}', failing)\n"
    )


def test_disk_full_during_the_write_is_one_line_and_leaves_nothing(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "pruned.gguf"
    out.parent.mkdir()
    full = failing("gatenorm_edge.rewrite:_copy_range", "OSError(errno.ENOSPC, 'No space left on device')", 10)
    done = run_cli("prune", stories260k, out, "--layers", "2", prelude=full)
    assert_one_line_error(done, "No space left on device")
    assert list(out.parent.iterdir()) == []


def test_a_folder_that_refuses_writes_is_one_line(stories260k: Path, tmp_path: Path) -> None:
    """Root ignores a read-only mode, so the refusal is simulated where the temporary file is created."""
    out = tmp_path / "locked" / "pruned.gguf"
    out.parent.mkdir()
    refused = failing("tempfile:mkstemp", f"PermissionError(errno.EACCES, 'Permission denied', {str(out.parent)!r})", 0)
    done = run_cli("prune", stories260k, out, "--layers", "2", prelude=refused)
    assert_one_line_error(done, "Permission denied", str(out.parent))
    assert list(out.parent.iterdir()) == []
