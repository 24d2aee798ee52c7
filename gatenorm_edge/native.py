"""llama.cpp's native code on this CPU: prove that a build runs here, rebuild it without AMX where it does not,
and turn a native crash into one ``error:`` line instead of a silent death.

Some virtual machines list AMX in /proc/cpuinfo, and grant it, yet fault on it: an llama.cpp built with
``GGML_NATIVE`` (llama-cpp-python's default) then dies of SIGILL or SIGSEGV in its AMX matrix products, the
first time a Q4_0, Q4_1 or Q8_0 model multiplies a batch of tokens. ``python -m gatenorm_edge.native``
(run by ``make install``) decodes one such batch in a subprocess; if it dies of a signal and the build has
AMX, llama-cpp-python is rebuilt with ``-mno-amx-tile -mno-amx-int8 -mno-amx-bf16`` (GCC lets these win over
``-march=native``), probed again, and the flags are recorded beside the environment.

At run time ``report_native_crashes`` hands Python's fault handler a pipe read by a small forked watcher:
when llama.cpp kills the process, the watcher prints what died and what to do, in one line.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from .errors import GatenormError

PACKAGE = "llama-cpp-python"
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
PROBE_MODEL = Path(__file__).resolve().parents[1] / "tests" / "data" / "stories260K-q8_0.gguf"
RECORD_NAME = "gatenorm-llama-build.json"
AMX_FEATURE = "AMX_INT8 = 1"  # in llama_print_system_info() when llama.cpp was compiled with AMX
FATAL_SIGNALS = {
    signal.SIGILL: "Illegal instruction",
    signal.SIGSEGV: "Segmentation fault",
    signal.SIGBUS: "Bus error",
    signal.SIGFPE: "Floating-point exception",
    signal.SIGABRT: "Aborted",
}  # faulthandler's names for them
CPU_FAULTS = (signal.SIGILL, signal.SIGSEGV, signal.SIGBUS)  # what an instruction the CPU will not run looks like

# Decode one batch of 32 tokens (AMX's tile path needs more than one row) after printing the build's features.
PROBE_CODE = """
import sys
import llama_cpp
print(llama_cpp.llama_print_system_info().decode(), flush=True)
from gatenorm_edge.harness.model import open_model
model = open_model(sys.argv[1], n_ctx=64)
model.logits(list(range(1, 33)), output_from=0)
print("probe passed", flush=True)
"""


def cmake_args_without_amx(existing: str = "") -> str:
    """``CMAKE_ARGS`` for an llama.cpp build with AMX off, after whatever the user already set."""
    flags = " ".join(f"-DCMAKE_{lang}_FLAGS='{NO_AMX_FLAGS}'" for lang in ("C", "CXX"))
    return f"{existing} {flags}".strip()


def reinstall_command(cmake_args: str) -> str:
    """The shell command that rebuilds the installed llama-cpp-python with ``cmake_args``."""
    return (
        f'CMAKE_ARGS="{cmake_args}" {sys.executable} -m pip install --force-reinstall --no-deps --no-cache-dir '
        f"{PACKAGE}=={version(PACKAGE)}"
    )


def cpu_lists_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def signal_name(signum: int) -> str:
    return f"{signal.Signals(signum).name} ({FATAL_SIGNALS.get(signum, 'signal').lower()})"


def crash_advice(signum: int) -> str:
    """What to do after llama.cpp died of ``signum``: for a CPU fault, rebuild it for this CPU."""
    if signum == signal.SIGILL:
        cause = "the CPU refused an instruction of this llama.cpp build"
    elif signum in CPU_FAULTS and cpu_lists_amx():
        cause = "this CPU lists AMX, which some virtual machines fault on"
    else:
        return "this is a bug in llama.cpp or in how it was called; rerun it once, and report it with the command line"
    return f"{cause}; rebuild llama.cpp for this CPU with `make install` (it probes and turns AMX off where needed) or: {reinstall_command(cmake_args_without_amx())}"


def describe_death(what: str, exit_code: int | None) -> str:
    """One line for a child process that ended early: its signal and what to do, or its exit status."""
    if exit_code is not None and -exit_code in FATAL_SIGNALS:
        return f"{what} died of {signal_name(-exit_code)} inside llama.cpp: {crash_advice(-exit_code)}"
    return f"{what} died (exit status {exit_code})"


# --------------------------------------------------------------------------------------------
# the probe of make install


@dataclass(frozen=True)
class BuildRecord:
    """What ``make install`` found: the llama-cpp-python it probed, the CMake arguments that build needs here."""

    llama_cpp_python: str
    cmake_args: str
    amx: bool

    @classmethod
    def read(cls, path: Path) -> BuildRecord | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        from .fileio import write_text_atomic

        write_text_atomic(path, json.dumps(asdict(self), indent=1) + "\n")


@dataclass(frozen=True)
class ProbeOutcome:
    """One probe run: its exit code (negative: the signal that killed it) and whether its build has AMX."""

    exit_code: int
    amx: bool
    output: str

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and "probe passed" in self.output


def run_probe(command: Sequence[str]) -> ProbeOutcome:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=300)
    return ProbeOutcome(done.returncode, AMX_FEATURE in done.stdout, (done.stdout + done.stderr).strip())


def probe_command(model: Path) -> list[str]:
    return [sys.executable, "-c", PROBE_CODE, str(model)]


def pip_rebuild(cmake_args: str) -> None:
    """Rebuild the installed llama-cpp-python from source with ``cmake_args`` (no pip cache: it holds the old build)."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", "--no-cache-dir",
               f"{PACKAGE}=={version(PACKAGE)}"]
    if subprocess.run(command, env={**os.environ, "CMAKE_ARGS": cmake_args}).returncode != 0:
        raise GatenormError(f"rebuilding {PACKAGE} failed; the command was: {reinstall_command(cmake_args)}")


def ensure_llama_runs(
    command: Sequence[str], *, record: Path, rebuild: Callable[[str], None] = pip_rebuild,
    say: Callable[[str], None] = print,
) -> BuildRecord:
    """Probe the installed llama.cpp; when it dies of a CPU fault and has AMX, rebuild it without AMX and probe
    again. The CMake arguments of the build that runs are recorded in ``record``."""
    installed = version(PACKAGE)
    earlier = BuildRecord.read(record)
    cmake_args = earlier.cmake_args if earlier is not None and earlier.llama_cpp_python == installed else os.environ.get("CMAKE_ARGS", "")
    outcome = run_probe(command)
    if not outcome.passed and -outcome.exit_code in CPU_FAULTS and outcome.amx:
        cmake_args = cmake_args_without_amx(os.environ.get("CMAKE_ARGS", ""))
        say(f"llama.cpp ({PACKAGE} {installed}, built with AMX) died of {signal_name(-outcome.exit_code)} on a Q8_0 "
            f"batch: this CPU lists AMX but faults on it; rebuilding it with AMX off ({NO_AMX_FLAGS}), about 5 minutes")
        rebuild(cmake_args)
        outcome = run_probe(command)
    if not outcome.passed:
        last = outcome.output.splitlines()[-1] if outcome.output else "no output"
        cause = signal_name(-outcome.exit_code) if -outcome.exit_code in FATAL_SIGNALS else f"exit status {outcome.exit_code}"
        raise GatenormError(f"llama.cpp ({PACKAGE} {installed}) cannot decode a batch on this CPU: {cause} ({last})")
    result = BuildRecord(installed, cmake_args, outcome.amx)
    result.write(record)
    say(f"llama.cpp ({PACKAGE} {installed}, AMX {'on' if outcome.amx else 'off'}) decodes a Q8_0 batch on this CPU; "
        f"build recorded in {record}")
    return result


def record_path() -> Path:
    """Beside the environment the package is installed in (a venv's root), else in the user's cache."""
    from .fileio import cache_folder

    prefix = Path(sys.prefix)
    return prefix / RECORD_NAME if os.access(prefix, os.W_OK) else cache_folder("build") / RECORD_NAME


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    model = Path(args[0]) if args else PROBE_MODEL
    try:
        if not model.is_file():
            raise GatenormError(f"{model}: no such file (the probe model is tests/data/stories260K-q8_0.gguf)")
        ensure_llama_runs(probe_command(model), record=record_path())
    except GatenormError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------
# native crashes at run time

FAULT_LINE = re.compile(r"Fatal Python error: (\w[\w -]*)")
FRAME_LINE = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def crash_line(what: str, report: str) -> str | None:
    """The one line for faulthandler's ``report`` of a fatal signal (None when there is none)."""
    match = FAULT_LINE.search(report)
    names = {name: signum for signum, name in FATAL_SIGNALS.items()}
    if match is None or match[1].strip() not in names:
        return None
    signum = names[match[1].strip()]
    frame = FRAME_LINE.search(report)
    where = f" (called from {Path(frame[1]).name}:{frame[2]}, {frame[3]})" if frame else ""
    return f"error: {what} died of {signal_name(signum)} in native code{where}: {crash_advice(signum)}"


def report_native_crashes(what: str) -> None:
    """From now on, a fatal signal in this process (llama.cpp's native code) ends with one ``error:`` line on
    stderr naming ``what`` died and what to do, written by a forked watcher that reads the fault handler's report."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the watcher: stays until the main process ends (its end of the pipe closes)
        status = 0
        try:
            os.close(write_fd)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the main process handles it
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)  # a reader of the main process's stdout sees its end when the main process ends
            chunks = []
            while chunk := os.read(read_fd, 65536):
                chunks.append(chunk)
            line = crash_line(what, b"".join(chunks).decode("utf-8", "replace"))
            if line is not None:
                os.write(2, (line + "\n").encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(read_fd)
    faulthandler.enable(file=write_fd, all_threads=True)  # llama.cpp's threads have no Python frames; the caller's has


if __name__ == "__main__":
    sys.exit(main())
