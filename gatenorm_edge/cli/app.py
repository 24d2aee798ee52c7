"""The typer application object and the entry point that turns known errors into one line."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from types import FrameType

import typer

from ..errors import GatenormError
from ..options import CACHE_TYPES

app = typer.Typer(
    name="gatenorm-edge",
    help=(
        "Rank a model's attention sublayers by query-key coupling (Gate-Norm), remove the "
        "weakest from a GGUF file, and measure what that buys on your CPU.\n\n"
        "Typical session:\n\n"
        "  gatenorm-edge score model.gguf --json scores.json\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --plan scores.json --count 4\n\n"
        "  gatenorm-edge compare model.gguf pruned.gguf --text wiki.test.raw"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

INTERRUPTED = 130  # the shell's status for a run stopped by SIGINT


def fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(2)


def choices(name: str, values: Sequence[str]) -> type[Enum]:
    """The one way options take a choice: an Enum of strings, which ``--help`` lists and parsing enforces."""
    return Enum(name, [(value, value) for value in values], type=str)


CacheType = choices("CacheType", CACHE_TYPES)
CACHE_TYPE_HELP = (
    "KV-cache type for K and V (llama.cpp's -ctk/-ctv): f16 (llama.cpp's default), q8_0 or q4_0; quantized ones "
    "need flash attention and are often the cheapest speed at depth."
)


def chosen(value: Enum | None) -> str | None:
    """The plain string of a choice (None stays None)."""
    return None if value is None else str(value.value)


def check_output_folders(*paths: Path | None) -> None:
    """The one check on report outputs (``--json``, ``--md``, ``--plot``): each given path's folder exists,
    so a long run never ends unable to write what it measured."""
    for path in paths:
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise GatenormError(f"{path}: the folder it would go in does not exist")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary outputs are removed on the way out."""
    raise KeyboardInterrupt


def _option_error(exc: typer.TyperException) -> str:
    """A parsing error (bad option value, missing argument, unknown option) as one line."""
    context = getattr(exc, "ctx", None)
    hint = f" (see {context.command_path} --help)" if context is not None else ""
    message = " ".join(exc.format_message().split()).replace("Value error, ", "")  # pydantic's prefix
    return message + hint


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app; every failure, option parsing included, is one
    ``error:`` line and exit status 2 (interruption: status 130). Run as the console script, a native
    crash (a signal in llama.cpp) also ends in one ``error:`` line, with the signal's own exit status."""
    signal.signal(signal.SIGTERM, _interrupt)
    args = sys.argv[1:] if argv is None else argv
    if argv is None and args and not args[0].startswith("-"):
        from ..native import report_native_crashes

        report_native_crashes(f"gatenorm-edge {args[0]}")
    try:
        status = app(args=args or ["--help"], prog_name="gatenorm-edge", standalone_mode=False)
    except typer.TyperException as exc:
        fail(_option_error(exc))
    except GatenormError as exc:
        fail(str(exc))
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        raise SystemExit(INTERRUPTED) from None
    except OSError as exc:
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    if status == INTERRUPTED:  # typer turns KeyboardInterrupt into this status after unwinding
        typer.echo("interrupted", err=True)
    sys.exit(status if isinstance(status, int) else 0)
