"""Command-line interface: a thin typer layer over the library modules."""

from . import commands  # noqa: F401  (registers every subcommand on ``app``)
from .app import app, main

__all__ = ["app", "main"]
