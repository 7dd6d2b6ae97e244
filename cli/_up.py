"""`mailmeta up`: the whole pipeline on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mailmeta.cli._app import app
from mailmeta.config import ConfigError, Settings


@app.command()
def up(
    config: Annotated[
        Path | None, typer.Option(help="Customers YAML (default: the bundled example).")
    ] = None,
    data_dir: Annotated[Path, typer.Option(help="Where ClickHouse data and logs live.")] = Path(
        ".mailmeta"
    ),
    smtp_port: Annotated[int, typer.Option(help="SMTP front end port on 127.0.0.1.")] = 2525,
    api_port: Annotated[int, typer.Option(help="Query API port on 127.0.0.1.")] = 8025,
    kafka_bootstrap: Annotated[
        str | None,
        typer.Option(help="Use this Kafka (host:port) instead of starting the local broker."),
    ] = None,
    broker_port: Annotated[int, typer.Option(help="Port of the bundled local broker.")] = 9092,
    partitions: Annotated[int, typer.Option(help="Partitions of topics mailmeta creates.")] = 3,
) -> None:
    """Run the whole pipeline on this machine until Ctrl-C (or SIGTERM)."""
    from mailmeta.local.supervisor import run_up

    overrides: dict[str, object] = {
        "data_dir": data_dir,
        "smtp_port": smtp_port,
        "api_port": api_port,
        "partitions": partitions,
    }
    if config is not None:
        overrides["config"] = config
    if kafka_bootstrap:
        overrides["kafka_bootstrap"] = kafka_bootstrap
    settings = Settings(**overrides)
    try:
        code = run_up(settings, local_broker=kafka_bootstrap is None, broker_port=broker_port)
    except ConfigError as exc:
        typer.echo(f"mailmeta: invalid configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None
    except (RuntimeError, TimeoutError, OSError) as exc:
        typer.echo(f"mailmeta: could not start: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)
