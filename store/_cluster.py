"""ClickHouse cluster mode (``MAILMETA_CLICKHOUSE_CLUSTER``): which table is what, the DDL.

Two kinds of table:

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

from mailmeta.store._migrations import (
    ACCESS_LOG_TABLE,
    AUDIT_TABLE,
    ERASURE_LOG_TABLE,
    HOURLY_EVENTS_TABLE,
    HOURLY_TABLE,
    HOURLY_VIEW,
    LEDGER_TABLE,
    POLICY_VERSIONS_TABLE,
    RETENTION_TABLE,
    TABLE,
    TOKENS_TABLE,
    WEBHOOK_ENDPOINTS_TABLE,
    WEBHOOK_OUTBOX_TABLE,
    Migration,
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
_CREATE = re.compile(
    r"\s*CREATE TABLE IF NOT EXISTS (\w+)\s*(\(.*\))\s*ENGINE = (\w*MergeTree)(?:\(([^)]*)\))?(.*)",
    re.DOTALL,
)
_ADD_INDEX = re.compile(r"\s*ALTER TABLE (\w+) (ADD INDEX IF NOT EXISTS .*)", re.DOTALL)
_MODIFY_SETTING = re.compile(r"\s*ALTER TABLE (\w+) (MODIFY SETTING .*)", re.DOTALL)
_VIEW = re.compile(
    r"\s*CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+) TO (\w+)(\s+AS .* FROM )(\w+)(\s*.*)",
    re.DOTALL,
)
_DROP_VIEW = re.compile(r"\s*DROP VIEW IF EXISTS (\w+)\s*", re.DOTALL)
_INSERT_SELECT = re.compile(r"\s*INSERT INTO (\w+)\s.*", re.DOTALL)
# Single-node history a cluster schema never had: every cluster schema is created whole by
# code that has migration 6, before any event is stored, so the legacy summing table is empty
# there. Its backfill and view are left out (a replica still running migration 5 while
# another has run 6 must not bring the dropped view back), and so is 6's clean-up of it
# (a mutation with a subquery, which replicated tables refuse).
_SINGLE_NODE_ONLY = (
    re.compile(rf"\s*INSERT INTO {HOURLY_TABLE}\b"),
    re.compile(rf"\s*CREATE MATERIALIZED VIEW IF NOT EXISTS {HOURLY_VIEW}\b"),
    re.compile(rf"\s*ALTER TABLE {HOURLY_TABLE} DELETE\b"),
)


@dataclass(frozen=True, slots=True)
class Cluster:
    """A ClickHouse cluster (a ``remote_servers`` name) to create and use the schema on.

    ``emulated`` is for tests only: chdb has neither Keeper nor a distributed DDL queue, so
    it gets the same table layout with plain engines and statements without ``ON CLUSTER``
    (run on a one-shard local cluster, where every shard is this process).
    """

    name: str
    emulated: bool = False

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
        """The table holding the rows of ``table`` on this server."""
        return table + LOCAL_SUFFIX if table in SHARDING_KEYS else table

    def alter_target(self, table: str) -> str:
        """What an ALTER (DELETE, UPDATE, MATERIALIZE TTL) or OPTIMIZE of ``table`` names."""
        if table in SHARDING_KEYS:
            return self.local(table) + self.on_cluster
        if table in EVERY_NODE:
            return table  # one replica set over all servers: Keeper carries the mutation
        raise KeyError(f"{table!r} is neither sharded nor on every node")

    # --- DDL ---------------------------------------------------------------------------

    def _engine(self, engine: str, args: str | None, path: str, replica: str) -> str:
        extra = f", {args}" if args else ""
        if self.emulated:
            return f"{engine}({args or ''})"
        return f"Replicated{engine}('{path}', '{replica}'{extra})"

    def _create(self, m: re.Match[str]) -> tuple[str, ...]:
        name, body, engine, args, rest = m.groups()
        if name in SHARDING_KEYS:
            local = self.local(name)
            path = f"/clickhouse/tables/{{shard}}/{{database}}/{local}"
            eng = self._engine(engine, args, path, "{replica}")
            return (
                f"CREATE TABLE IF NOT EXISTS {local}{self.on_cluster}\n{body}\nENGINE = {eng}{rest}",
                f"CREATE TABLE IF NOT EXISTS {name}{self.on_cluster} AS {local} "
                f"ENGINE = Distributed('{self.name}', currentDatabase(), {local}, "
                f"{SHARDING_KEYS[name]})",
            )
        if name in EVERY_NODE:
            # No {shard} in the path: every server is a replica of the same table, named
            # by shard and replica so the names are unique across the cluster.
            path = f"/clickhouse/tables/all/{{database}}/{name}"
            eng = self._engine(engine, args, path, "{shard}-{replica}")
            return (
                f"CREATE TABLE IF NOT EXISTS {name}{self.on_cluster}\n{body}\nENGINE = {eng}{rest}",
            )
        raise ValueError(f"table {name!r} has no cluster layout: add it to store/_cluster.py")

    def statement(self, sql: str) -> tuple[str, ...]:
        """The cluster form of one single-node migration statement (none, one or two)."""
        if any(p.match(sql) for p in _SINGLE_NODE_ONLY):
            return ()
        if m := _CREATE.fullmatch(sql):
            return self._create(m)
        if m := _ADD_INDEX.fullmatch(sql):
            return (f"ALTER TABLE {self.alter_target(m[1])} {m[2]}",)
        if m := _MODIFY_SETTING.fullmatch(sql):
            # Table settings are each replica's own metadata (not replicated): every server.
            return (f"ALTER TABLE {self.local(m[1])}{self.on_cluster} {m[2]}",)
        if m := _VIEW.fullmatch(sql):
            view, target, select, source, tail = m.groups()
            # A view sees the blocks inserted into the table it reads: on each server that
            # is the local table, and it writes the local (replicated) target beside it.
            return (
                f"CREATE MATERIALIZED VIEW IF NOT EXISTS {view}{self.on_cluster} TO "
                f"{self.local(target)}{select}{self.local(source)}{tail}",
            )
        if m := _DROP_VIEW.fullmatch(sql):
            return (f"DROP VIEW IF EXISTS {m[1]}{self.on_cluster}",)
        if (m := _INSERT_SELECT.fullmatch(sql)) and m[1] in SHARDING_KEYS:
            return (sql,)  # through the Distributed tables, as the queries
        raise ValueError(f"no cluster form for migration statement: {sql.strip()[:80]!r}")

    def migration(self, m: Migration) -> Migration:
        return Migration(
            m.version, m.name, tuple(s for sql in m.statements for s in self.statement(sql))
        )
