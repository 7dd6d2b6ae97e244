"""Operational commands every deployment runs once per release (compose init jobs, a Kubernetes
Job, `mailmeta up`): create or check the topics, migrate the store, bootstrap the first token.

Settings come from MAILMETA_* environment variables, as for the stages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from mailmeta.cli._app import app
from mailmeta.cli._client import fail
from mailmeta.cli._token import token_app
from mailmeta.config import ConfigError, Customers, Settings, load_customers
from mailmeta.kafka import (
    KafkaConfigError,
    TopicError,
    admin,
    check_connection,
    ensure_topics,
    replication,
)

kafka_app = typer.Typer(help="Kafka topics mailmeta needs.", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")
store_app = typer.Typer(help="The ClickHouse schema.", no_args_is_help=True)
app.add_typer(store_app, name="store")


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as exc:  # pydantic's ValidationError names the variable
        fail(f"invalid settings: {' '.join(str(exc).split())}", 2)


def _customers(settings: Settings) -> Customers:
    try:
        return load_customers(settings.config, settings.region)
    except ConfigError as exc:
        fail(str(exc), 2)


@kafka_app.command("init")
def kafka_init(
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the brokers.")] = 30.0,
) -> None:
    """Create the topics (partitions, replication, min.insync.replicas, retention, compaction)
    or check existing ones. Idempotent; exits 1 naming the topic when one contradicts what
    mailmeta needs."""
    s = _settings()
    shortest = _customers(s).shortest_retention_days
    try:
        if not check_connection(s, timeout=timeout):
            typer.echo(f"mailmeta: Kafka at {s.kafka_bootstrap} is not reachable", err=True)
            raise typer.Exit(1)
        warnings = ensure_topics(s, shortest, timeout=timeout)
        rf, isr = replication(s, _brokers(s, timeout))
    except (KafkaConfigError, TopicError) as exc:
        typer.echo(f"mailmeta: {exc}", err=True)
        raise typer.Exit(1) from None
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"topics ready (replication {rf}, min.insync.replicas {isr})")


def _brokers(s: Settings, timeout: float) -> int:
    return len(admin(s).list_topics(timeout=timeout).brokers)


@store_app.command("migrate")
def store_migrate() -> None:
    """Apply the schema migrations not yet applied (idempotent; concurrent runs are safe:
    every statement is IF NOT EXISTS and the ledger is keyed by version)."""
    from mailmeta.store import ClickHouseStore, StoreError, safe_dsn  # deferred: chdb is heavy

    s = _settings()
    retention = {c.id: c.retention_days for c in _customers(s).here()}
    try:
        store = ClickHouseStore(s.resolved_dsn(), retention, cluster=s.clickhouse_cluster)
    except StoreError as exc:
        typer.echo(f"mailmeta: ClickHouse at {safe_dsn(s.resolved_dsn())}: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        typer.echo(f"schema at version {store.schema_version()} ({safe_dsn(s.resolved_dsn())})")
    finally:
        store.close()


@token_app.command("bootstrap")
def token_bootstrap(
    out: Annotated[
        Path | None,
        typer.Option(help="Write the token to this file (mode 0600) instead of printing it."),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Create one even though operator tokens exist.")
    ] = False,
) -> None:
    """Create the first operator token, straight in the store (no API needed). Refuses when
    live operator tokens exist, unless --force; the token is shown once."""
    from mailmeta.api import SCOPES, TokenAuthority  # deferred: chdb and fastapi are heavy
    from mailmeta.store import ClickHouseStore

    s = _settings()
    retention = {c.id: c.retention_days for c in _customers(s).here()}
    store = ClickHouseStore(s.resolved_dsn(), retention, cluster=s.clickhouse_cluster)
    try:
        authority = TokenAuthority(store).load()
        live = [t for t in authority.tokens() if t.customer_id is None and t.revoked_at is None]
        if live and not force:
            typer.echo(
                f"mailmeta: {len(live)} operator token(s) exist; pass --force to add another",
                err=True,
            )
            raise typer.Exit(1)
        _record, token = authority.create("operator", None, SCOPES)
        authority.close()
    finally:
        store.close()
    if out is None:
        typer.echo(token)
        return
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    typer.echo(f"operator token written to {out} (mode 0600)")
