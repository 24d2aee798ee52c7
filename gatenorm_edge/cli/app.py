"""The typer application object and the entry point that turns known errors into one line."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import typer

from ..errors import GatenormError

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


def fail(message: str) -> None:
    """Print ``error: message`` on stderr and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(2)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so temporary outputs are removed on the way out."""
    raise KeyboardInterrupt


def main() -> None:
    """Console-script entry point: run the app, reporting known failures in one line."""
    from . import commands  # noqa: F401  (registers every subcommand on ``app``)

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app()
    except GatenormError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130)
    except OSError as exc:
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    sys.exit(0)
