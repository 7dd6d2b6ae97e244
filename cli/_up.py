"""`mailmeta up`: the whole pipeline on this machine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from mailmeta.cli._app import app
from mailmeta.cli._client import fail
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
    broker: Annotated[
        str,
        typer.Option(
            help="Local broker: 'kafka' (Apache Kafka, durable; `make up` fetches it) or "
            "'tansu' (memory-only: mail answered 250 is lost if the pipeline is killed)."
        ),
    ] = "kafka",
    partitions: Annotated[int, typer.Option(help="Partitions of topics mailmeta creates.")] = 3,
    relay_to: Annotated[
        str | None,
        typer.Option(help="Relay mode: forward each message to this next hop (HOST:PORT)."),
    ] = None,
    relay_networks: Annotated[
        str | None, typer.Option(help="Comma-separated CIDRs allowed to relay to any domain.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate for STARTTLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for STARTTLS.")] = None,
    tls_self_signed: Annotated[
        bool, typer.Option(help="STARTTLS with a generated self-signed certificate.")
    ] = False,
    ingest_workers: Annotated[
        int, typer.Option(min=1, max=64, help="SMTP front end processes sharing the port.")
    ] = 1,
    ingest_metrics_port: Annotated[
        int, typer.Option(help="Prometheus metrics port of the front end (0: off).")
    ] = 0,
    region_port_step: Annotated[
        int,
        typer.Option(
            min=1,
            help="With regions in the customers file, each runs side by side: region N (in "
            "name order after the default one) uses every port + N x this step.",
        ),
    ] = 100,
    milter_port: Annotated[
        int | None,
        typer.Option(help="Also run the read-only milter for a local Postfix on this port."),
    ] = None,
    maillog: Annotated[
        Path | None,
        typer.Option(help="Also follow this Postfix maillog_file (delivery outcomes)."),
    ] = None,
) -> None:
    """Run the whole pipeline on this machine until Ctrl-C (or SIGTERM)."""
    from mailmeta.local.supervisor import PostfixParts, run_up

    overrides: dict[str, object] = {
        "data_dir": data_dir,
        "smtp_port": smtp_port,
        "api_port": api_port,
        "partitions": partitions,
        # Local mode: fast group joins and rebalances (real clusters keep Kafka's 45 s).
        "session_timeout_ms": int(os.environ.get("MAILMETA_SESSION_TIMEOUT_MS", "6000")),
    }
    if config is not None:
        overrides["config"] = config
    # Only what was given: the rest keeps its MAILMETA_* environment value or default.
    optional: dict[str, object | None] = {
        "relay_to": relay_to,
        "relay_networks": relay_networks,
        "tls_cert": str(tls_cert.resolve()) if tls_cert else None,
        "tls_key": str(tls_key.resolve()) if tls_key else None,
        "tls_self_signed": tls_self_signed or None,
        "ingest_workers": ingest_workers if ingest_workers != 1 else None,
        "ingest_metrics_port": ingest_metrics_port or None,
    }
    overrides.update({k: v for k, v in optional.items() if v is not None})
    if kafka_bootstrap:
        overrides["kafka_bootstrap"] = kafka_bootstrap
    if broker not in ("kafka", "tansu"):
        typer.echo(f"mailmeta: --broker must be 'kafka' or 'tansu', not {broker!r}", err=True)
        raise typer.Exit(2)
    try:
        settings = Settings(**overrides)
    except ValueError as exc:  # pydantic's ValidationError names the variable
        fail(f"invalid settings: {' '.join(str(exc).split())}", 2)
    try:
        code = run_up(
            settings,
            local_broker=kafka_bootstrap is None,
            broker_port=broker_port,
            broker_kind="kafka" if broker == "kafka" else "tansu",
            region_port_step=region_port_step,
            postfix=PostfixParts(milter_port, maillog.resolve() if maillog else None)
            if milter_port is not None or maillog is not None
            else None,
        )
    except ConfigError as exc:
        fail(str(exc), 2)
    except (RuntimeError, TimeoutError, OSError) as exc:  # KafkaConfigError too
        typer.echo(f"mailmeta: could not start: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)
