"""Where the store's tables live: one server (``SINGLE_NODE``) or a ClickHouse cluster.

Migrations (store/_migrations.py) and the store ask the layout for names, engines and DDL;
nothing else knows which mode it runs in. Cluster mode (``MAILMETA_CLICKHOUSE_CLUSTER``) has
two kinds of table:

- **Sharded** (the big ones): a ``Replicated…MergeTree`` ``<name>_local`` on every server,
  under ``/clickhouse/tables/{shard}/…`` (one replica set per shard), and a ``Distributed``
  table under the name the queries use. The sharding key is a function of columns every
  copy of a row shares, so the copies ``FINAL`` must collapse (redeliveries, rewrites) are
  always on one shard: ``cityHash64(event_id)`` for events and their per-event hourly rows.
- **On every node** (small control tables read on hot paths: tokens on every API request,
  the erasure log before every insert, retention overrides, policy history, the audit log,
  the migration ledger): one ``Replicated…MergeTree`` replica set spanning the whole cluster
  (no ``{shard}`` in its path), read locally, so ``FINAL`` sees every version of a key and
  no read fans out. A write on any server reaches all of them through Keeper.

Mutations (erasure, retention, rewrites, TTL) target the local tables: ``ON CLUSTER`` for
sharded ones (one replica per shard runs it; replication carries it to the others), plain
for every-node ones (one replica set: Keeper carries it everywhere). Replicated tables refuse
mutations with subqueries or non-deterministic functions, so callers bind ``now`` and
constants instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mailmeta.store._tables import (
    ACCESS_LOG_TABLE,
    AUDIT_TABLE,
    ERASURE_LOG_TABLE,
    HOURLY_EVENTS_TABLE,
    HOURLY_TABLE,
    LEDGER_TABLE,
    POLICY_VERSIONS_TABLE,
    RETENTION_TABLE,
    TABLE,
    TOKENS_TABLE,
    WEBHOOK_ENDPOINTS_TABLE,
    WEBHOOK_OUTBOX_TABLE,
)

# Sharded tables and their sharding keys (each a function of columns all copies share).
SHARDING_KEYS: dict[str, str] = {
    # Every version of one event (same event_id) on one shard: FINAL and the rewrite's
    # "old copies of rewritten events" stay shard-local.
    TABLE: "cityHash64(event_id)",
    # Written by the view on messages_local, hence on the event's shard; the same key for
    # inserts through the Distributed table (migration 6's backfill) keeps them together.
    HOURLY_EVENTS_TABLE: "cityHash64(event_id)",
    # The legacy summing table: its whole summing key, so rows to sum meet on one shard.
    HOURLY_TABLE: "cityHash64(customer_id, hour, status)",
    # Grows with every API request; no dedup. A token's records stay together.
    ACCESS_LOG_TABLE: "cityHash64(token_id)",
}
EVERY_NODE: tuple[str, ...] = (
    LEDGER_TABLE,
    RETENTION_TABLE,
    TOKENS_TABLE,
    POLICY_VERSIONS_TABLE,
    ERASURE_LOG_TABLE,
    AUDIT_TABLE,
    # webhooks: small, read by the webhook stage and the API (store/_webhooks.py)
    WEBHOOK_ENDPOINTS_TABLE,
    WEBHOOK_OUTBOX_TABLE,
)
LOCAL_SUFFIX = "_local"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,99}")


class Layout:
    """One server: every table is itself, DDL as written. The cluster overrides each answer."""

    # Whether the schema may have the history of single-node databases created before
    # migration 6 (the legacy summing table's backfill, view and clean-up).
    has_legacy_history = True

    @property
    def on_cluster(self) -> str:
        return ""

    def local(self, table: str) -> str:
        """The table holding the rows of ``table`` on this server."""
        return table

    def alter_target(self, table: str) -> str:
        """What an ALTER (DELETE, UPDATE, MATERIALIZE TTL) or OPTIMIZE of ``table`` names."""
        return table

    @property
    def insert_settings(self) -> dict[str, Any] | None:
        return None

    # --- DDL ---------------------------------------------------------------------------

    def create_table(
        self, name: str, columns: str, engine: str, args: str, tail: str
    ) -> tuple[str, ...]:
        eng = f"{engine}({args})" if args else engine
        return (f"CREATE TABLE IF NOT EXISTS {name}\n{columns}\nENGINE = {eng}\n{tail}",)

    def add_index(self, table: str, index: str) -> tuple[str, ...]:
        return self.alter(table, f"ADD INDEX IF NOT EXISTS {index}")

    def alter(self, table: str, clause: str) -> tuple[str, ...]:
        """An ALTER of the table's rows or parts (a projection, a mutation)."""
        return (f"ALTER TABLE {self.alter_target(table)} {clause}",)

    def optimize_final(self, table: str) -> tuple[str, ...]:
        return (f"OPTIMIZE TABLE {self.alter_target(table)} FINAL",)

    def modify_setting(self, table: str, settings: str) -> tuple[str, ...]:
        return (f"ALTER TABLE {table} MODIFY SETTING {settings}",)

    def create_view(
        self, view: str, target: str, select: str, source: str, tail: str
    ) -> tuple[str, ...]:
        return (
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view} TO {target}\n"
            f"AS {select}\nFROM {source}\n{tail}",
        )

    def drop_view(self, view: str) -> tuple[str, ...]:
        return (f"DROP VIEW IF EXISTS {view}",)

    def insert_select(self, table: str, select: str) -> tuple[str, ...]:
        return (f"INSERT INTO {table}\n{select}",)


SINGLE_NODE = Layout()


@dataclass(frozen=True)  # no slots: super() in the overrides
class Cluster(Layout):
    """A ClickHouse cluster (a ``remote_servers`` name) to create and use the schema on.

    ``emulated`` is for tests only: chdb has neither Keeper nor a distributed DDL queue, so
    it gets the same table layout with plain engines and statements without ``ON CLUSTER``
    (run on a one-shard local cluster, where every shard is this process).
    """

    name: str
    emulated: bool = False

    # Every cluster schema is created whole by code that has migration 6, before any event
    # is stored, so the legacy summing table is empty there. Its backfill and view are left
    # out (a replica still running migration 5 while another has run 6 must not bring the
    # dropped view back), and so is 6's clean-up of it (a mutation with a subquery, which
    # replicated tables refuse).
    has_legacy_history = False

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(
                f"MAILMETA_CLICKHOUSE_CLUSTER: {self.name!r} is not a cluster name "
                "(letters, digits, '_' and '-', starting with a letter or '_')"
            )

    # --- names -------------------------------------------------------------------------

    @property
    def on_cluster(self) -> str:
        return "" if self.emulated else f" ON CLUSTER `{self.name}`"

    def local(self, table: str) -> str:
        return table + LOCAL_SUFFIX if table in SHARDING_KEYS else table

    def alter_target(self, table: str) -> str:
        if table in SHARDING_KEYS:
            return self.local(table) + self.on_cluster
        if table in EVERY_NODE:
            return table  # one replica set over all servers: Keeper carries the mutation
        raise KeyError(f"{table!r} is neither sharded nor on every node")

    @property
    def insert_settings(self) -> dict[str, Any] | None:
        # A Distributed insert returns only once every shard holds its rows (not queued on
        # this server): what the sink commits and what a rewrite then deletes is stored.
        return {"distributed_foreground_insert": 1}

    # --- DDL ---------------------------------------------------------------------------

    def _engine(self, engine: str, args: str, path: str, replica: str) -> str:
        if self.emulated:
            return f"{engine}({args})"
        extra = f", {args}" if args else ""
        return f"Replicated{engine}('{path}', '{replica}'{extra})"

    def create_table(
        self, name: str, columns: str, engine: str, args: str, tail: str
    ) -> tuple[str, ...]:
        on = self.on_cluster
        if name in SHARDING_KEYS:
            local = self.local(name)
            path = f"/clickhouse/tables/{{shard}}/{{database}}/{local}"
            eng = self._engine(engine, args, path, "{replica}")
            return (
                f"CREATE TABLE IF NOT EXISTS {local}{on}\n{columns}\nENGINE = {eng}\n{tail}",
                f"CREATE TABLE IF NOT EXISTS {name}{on} AS {local} "
                f"ENGINE = Distributed('{self.name}', currentDatabase(), {local}, "
                f"{SHARDING_KEYS[name]})",
            )
        if name in EVERY_NODE:
            # No {shard} in the path: every server is a replica of the same table, named
            # by shard and replica so the names are unique across the cluster.
            path = f"/clickhouse/tables/all/{{database}}/{name}"
            eng = self._engine(engine, args, path, "{shard}-{replica}")
            return (f"CREATE TABLE IF NOT EXISTS {name}{on}\n{columns}\nENGINE = {eng}\n{tail}",)
        raise ValueError(f"table {name!r} has no cluster layout: add it to store/_layout.py")

    def modify_setting(self, table: str, settings: str) -> tuple[str, ...]:
        # Table settings are each replica's own metadata (not replicated): every server.
        return (f"ALTER TABLE {self.local(table)}{self.on_cluster} MODIFY SETTING {settings}",)

    def create_view(
        self, view: str, target: str, select: str, source: str, tail: str
    ) -> tuple[str, ...]:
        # A view sees the blocks inserted into the table it reads: on each server that is
        # the local table, and it writes the local (replicated) target beside it.
        return super().create_view(
            view + self.on_cluster, self.local(target), select, self.local(source), tail
        )

    def drop_view(self, view: str) -> tuple[str, ...]:
        return (f"DROP VIEW IF EXISTS {view}{self.on_cluster}",)

    def insert_select(self, table: str, select: str) -> tuple[str, ...]:
        if table not in SHARDING_KEYS:
            raise ValueError(f"no cluster form for a backfill of {table!r}")
        return super().insert_select(table, select)  # through the Distributed table
