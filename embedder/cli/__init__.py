"""The typer CLI: a thin layer that turns domain exceptions into one-line messages."""

from embedder.cli.app import app, main

__all__ = ["app", "main"]
