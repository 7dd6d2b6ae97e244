"""The `mailmeta` command line: one module per command group, all on one Typer app."""

from __future__ import annotations

import mailmeta.cli._policy
import mailmeta.cli._storage
import mailmeta.cli._token  # noqa: F401  (registers commands)
from mailmeta.cli import _config, _ops, _postfix, _up, _webhooks  # noqa: F401  (registers commands)
from mailmeta.cli._app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
