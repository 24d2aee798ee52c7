"""Helpers shared by the tests: run the CLI in a subprocess, check one-line errors, raw llama.cpp logits."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GGML_TYPE_F32 = 0


def run_cli(*args: str | Path, cwd: Path = ROOT, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``gatenorm-edge ARGS`` in a fresh interpreter; ``prelude`` is Python run before the CLI starts."""
    if prelude:
        command = ["-c", f"{prelude}\nimport sys\nfrom gatenorm_edge.cli import main\nsys.argv[0] = 'gatenorm-edge'\nmain()"]
    else:
        command = ["-m", "gatenorm_edge"]
    return subprocess.run(
        [sys.executable, *command, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def spawn_cli(*args: str | Path, prelude: str = "", env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``gatenorm-edge ARGS`` started in the background, taking SIGINT as from a terminal even when this test
    run itself was started with SIGINT ignored (as a shell starts background jobs, and Python then keeps it
    ignored in every child)."""
    code = (
        "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        f"{prelude}\nimport sys\nfrom gatenorm_edge.cli import main\nsys.argv[0] = 'gatenorm-edge'\nmain()"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
    )


def finish(process: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """A spawned CLI's stdout and stderr once it ends; past ``timeout`` it is killed (never left running) and
    the test fails."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise


def run_cli_here(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``gatenorm-edge ARGS`` in this process (for commands that load no llama.cpp model, where a separate
    process proves nothing more): stdout and stderr captured through real files, the exit status kept."""
    from gatenorm_edge.cli import main

    argv = list(map(str, args))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
                status = 0
            except SystemExit as exit_:
                status = exit_.code if isinstance(exit_.code, int) else 1
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["gatenorm-edge", *argv], status, out.read(), err.read())


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit status 2 and exactly one stderr line ``error: ...`` containing every fragment; returns it."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def llama_cpp_logits(path: Path, tokens: list[int], *, flash_attn: bool = False, f32_kv: bool = True, n_ctx: int = 64) -> np.ndarray:
    """Logits for every position from stock llama.cpp; by default its most exact CPU path (F32 KV, FA off)."""
    kv_types = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv else {}
    model = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, flash_attn=flash_attn,
        verbose=False, n_threads=2, **kv_types,
    )
    try:
        model.eval(tokens)
        return np.array(model.scores[: len(tokens)], dtype=np.float64)
    finally:
        model.close()
