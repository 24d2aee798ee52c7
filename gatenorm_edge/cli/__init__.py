"""Command-line interface: a thin typer layer over the library modules."""

from .app import app, main

__all__ = ["app", "main"]
