"""The `mailmeta` command line: one module per command group, all on one Typer app."""

from __future__ import annotations

from mailmeta.cli import _config, _up  # noqa: F401  (registers commands)
from mailmeta.cli._app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
