"""`mailmeta milter` and `mailmeta maillog`: Postfix as a way in (README, "Postfix")."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mailmeta.cli._app import app


@app.command()
def milter(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Port for Postfix's smtpd_milters inet:HOST:PORT.")
    ] = 8899,
    answer_within: Annotated[
        float,
        typer.Option(
            help="0: answer Postfix at once. N > 0: wait for the event's acknowledgement (or "
            "spool), up to N seconds whatever the broker does."
        ),
    ] = 0.0,
) -> None:
    """A read-only milter for Postfix: one event per customer for every message received.
    Settings (Kafka, customers, spool) from MAILMETA_* variables."""
    from mailmeta.ingest.postfix import run_milter

    raise typer.Exit(run_milter(host, port, answer_within))


@app.command()
def maillog(
    file: Annotated[
        Path | None,
        typer.Option(help="Postfix's maillog_file to follow (default: standard input)."),
    ] = None,
    position: Annotated[
        Path | None,
        typer.Option(help="Durable position file (default: DATA_DIR/maillog.position)."),
    ] = None,
) -> None:
    """Follow Postfix's mail log: delivered / deferred / bounced / expired / rejected events
    of the messages it names. Settings from MAILMETA_* variables."""
    from mailmeta.ingest.postfix import run_maillog

    raise typer.Exit(run_maillog(file, position))
