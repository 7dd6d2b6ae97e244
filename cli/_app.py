"""The root Typer app; each command group lives in its own module and registers here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="mailmeta",
    help="Mail-metadata pipeline with automatic expiry: SMTP -> Kafka -> redaction -> ClickHouse.",
    no_args_is_help=True,
    add_completion=False,
)
