"""llama.cpp's own llama-bench, built from the llama.cpp the installed llama-cpp-python vendors, run as
interleaved processes (A B A B ..., one fresh process per round and model): a second measurement of tg at a
context depth beside `bench --vs`, independent of this package's harness.

The build is kept in ``~/.cache/gatenorm-edge/llama-bench/<version>`` (about 5 minutes on 2 cores the first
time): the source is the llama-cpp-python sdist (``pip download --no-binary``), compiled with GGML_NATIVE and,
where ``make install`` found that this CPU faults on AMX (its build record), with AMX off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

from ..errors import GatenormError
from ..fileio import cache_folder
from ..native import NO_AMX_FLAGS, PACKAGE, BuildRecord, record_path

CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"]


def binary() -> Path:
    """The llama-bench of the installed llama-cpp-python's llama.cpp, built when missing."""
    release = version(PACKAGE)
    home = cache_folder("llama-bench") / release
    built = home / "build" / "bin" / "llama-bench"
    if built.is_file():
        return built
    if shutil.which("cmake") is None:
        raise GatenormError("building llama-bench needs cmake on PATH (pip install cmake, or the system's package)")
    record = BuildRecord.read(record_path())
    flags = [] if record is None or record.amx else [f"-DCMAKE_{lang}_FLAGS={NO_AMX_FLAGS}" for lang in ("C", "CXX")]
    with tempfile.TemporaryDirectory() as tmp:
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"{PACKAGE}=={release}", "-d", tmp]
        subprocess.run(download, check=True)
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as sources:
            sources.extractall(tmp, filter="data")
        (vendored,) = Path(tmp).glob("*/vendor/llama.cpp")
        home.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(vendored, home)
    subprocess.run(["cmake", "-S", str(home), "-B", str(home / "build"), *CMAKE_OPTIONS, *flags], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(home / "build"), "--target", "llama-bench", "-j"], check=True,
                   stdout=subprocess.DEVNULL)
    return built


def tg_rate(model: Path, cache_type: str, depth: int, gen: int, threads: int) -> float:
    """One fresh llama-bench process: tg ``gen`` tokens/s after ``depth`` tokens, flash attention on."""
    command = [str(binary()), "-m", str(model), "-p", "0", "-n", str(gen), "-d", str(depth), "-fa", "1",
               "-t", str(threads), "-r", "1", "-ctk", cache_type, "-ctv", cache_type, "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        raise GatenormError(f"llama-bench failed on {model.name}: {last}")
    (row,) = json.loads(done.stdout)
    return float(row["avg_ts"])


def interleaved(models: list[tuple[Path, str]], depth: int, gen: int, rounds: int, threads: int) -> list[list[float]]:
    """tg tokens/s of each (model, cache type), one fresh process per round and model, A B A B ..."""
    rates: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for index, (model, cache_type) in enumerate(models):
            rates[index].append(tg_rate(model, cache_type, depth, gen, threads))
    return rates
