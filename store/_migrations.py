"""Versioned schema migrations: an ordered list of structured DDL steps, applied once each.

A step says what it creates or changes (a table's columns, engine and keys; an index; a
view's query); the layout (store/_layout.py: one server or a cluster) turns it into
statements. Every step is itself idempotent (IF NOT EXISTS), so a crash between running a
step and recording it, or two sinks starting at once against one server, is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mailmeta.store._layout import SINGLE_NODE, Layout
from mailmeta.store._tables import (
    ACCESS_LOG_RETENTION_DAYS,
    ACCESS_LOG_TABLE,
    AUDIT_TABLE,
    ERASURE_LOG_DAYS,
    ERASURE_LOG_TABLE,
    HOURLY_EVENTS_TABLE,
    HOURLY_EVENTS_VIEW,
    HOURLY_PROJECTION,
    HOURLY_RETENTION_DAYS,
    HOURLY_TABLE,
    HOURLY_VIEW,
    LEDGER_TABLE,
    POLICY_VERSIONS_TABLE,
    RETENTION_TABLE,
    TABLE,
    TOKENS_TABLE,
    WEBHOOK_ENDPOINTS_TABLE,
    WEBHOOK_OUTBOX_TABLE,
)

log = logging.getLogger("mailmeta.store")


class Step(Protocol):
    def ddl(self, layout: Layout) -> tuple[str, ...]:
        """The statements that take this step on ``layout`` (none, one or more)."""
        ...


@dataclass(frozen=True, slots=True)
class CreateTable:
    """``columns``: the parenthesised column list; ``tail``: keys, TTL and settings."""

    name: str
    columns: str
    engine: str
    tail: str
    engine_args: str = ""

    def ddl(self, layout: Layout) -> tuple[str, ...]:
        return layout.create_table(
            self.name, self.columns, self.engine, self.engine_args, self.tail
        )


@dataclass(frozen=True, slots=True)
class AddIndex:
    table: str
    index: str  # name, expression, type and granularity

    def ddl(self, layout: Layout) -> tuple[str, ...]:
        return layout.add_index(self.table, self.index)


@dataclass(frozen=True, slots=True)
class ModifySetting:
    table: str
    settings: str

    def ddl(self, layout: Layout) -> tuple[str, ...]:
        return layout.modify_setting(self.table, self.settings)


@dataclass(frozen=True, slots=True)
class Alter:
    """An ALTER of a table's data or parts (add or materialize a projection)."""

    table: str
    clause: str

    def ddl(self, layout: Layout) -> tuple[str, ...]:
        return layout.alter(self.table, self.clause)


@dataclass(frozen=True, slots=True)
class OptimizeFinal:
    """Merge every partition of the table into one part (collapses duplicate keys)."""

    table: str

    def ddl(self, layout: Layout) -> tuple[str, ...]:
        return layout.optimize_final(self.table)


@dataclass(frozen=True, slots=True)
class CreateView:
    """A materialized view ``SELECT … FROM source [tail]`` writing into ``target``."""

    name: str
    target: str
    select: str
    source: str
    tail: str = ""

    def ddl(self, layout: Layout) -> tuple[str, ...]:
        return layout.create_view(self.name, self.target, self.select, self.source, self.tail)


@dataclass(frozen=True, slots=True)
class DropView:
    name: str

    def ddl(self, layout: Layout) -> tuple[str, ...]:
        return layout.drop_view(self.name)


@dataclass(frozen=True, slots=True)
class InsertSelect:
    """A backfill: ``INSERT INTO table`` the rows of ``select`` (through the Distributed
    table on a cluster, as the queries)."""

    table: str
    select: str

    def ddl(self, layout: Layout) -> tuple[str, ...]:
        return layout.insert_select(self.table, self.select)


@dataclass(frozen=True, slots=True)
class Statement:
    """A statement taken as written: only inside ``LegacyOnly`` (one server's history)."""

    sql: str

    def ddl(self, layout: Layout) -> tuple[str, ...]:
        if not layout.has_legacy_history:
            raise ValueError(f"no cluster form for: {self.sql.strip()[:80]!r}")
        return (self.sql,)


@dataclass(frozen=True, slots=True)
class LegacyOnly:
    """Single-node history a cluster schema never had (see ``Layout.has_legacy_history``)."""

    step: Step

    def ddl(self, layout: Layout) -> tuple[str, ...]:
        return self.step.ddl(layout) if layout.has_legacy_history else ()


# Version ranges, so work on separate features never collides on a number:
#   1-19 messages and storage; 20-29 redaction policies; 30-39 API tokens and access logs;
#   40-49 webhooks.


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    steps: tuple[Step, ...]

    def ddl(self, layout: Layout = SINGLE_NODE) -> tuple[str, ...]:
        return tuple(sql for step in self.steps for sql in step.ddl(layout))

    @property
    def statements(self) -> tuple[str, ...]:
        """The single-node statements."""
        return self.ddl(SINGLE_NODE)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "create messages",
        (
            # ReplacingMergeTree on (customer_id, received_at, event_id): a redelivered event
            # has the same key and collapses to one row; policy_version as the version keeps
            # the copy redacted by the newest policy. Rows expire by their own retention.
            CreateTable(
                TABLE,
                """(
                    event_id UUID,
                    received_at DateTime64(3, 'UTC'),
                    customer_id LowCardinality(String),
                    status LowCardinality(String),
                    sender_ip Nullable(String),
                    helo Nullable(String),
                    mail_from Nullable(String),
                    rcpt_to Array(String),
                    message_id Nullable(String),
                    subject Nullable(String),
                    date_text Nullable(String),
                    -- Parsed in ClickHouse, vectorised: RFC 5322 and ISO-8601 dates.
                    date Nullable(DateTime64(3, 'UTC'))
                        MATERIALIZED parseDateTime64BestEffortOrNull(date_text, 3, 'UTC'),
                    size_bytes Nullable(UInt64),
                    smtp_reply Nullable(String),
                    processing_ms Nullable(Float64),
                    tls_version Nullable(String),
                    policy_version UInt32,
                    retention_days UInt16
                )""",
                "ReplacingMergeTree",
                engine_args="policy_version",
                tail="""
                PARTITION BY toYYYYMM(received_at)
                ORDER BY (customer_id, received_at, event_id)
                TTL received_at + toIntervalDay(retention_days)
                SETTINGS merge_with_ttl_timeout = 3600
                """,
            ),
        ),
    ),
    Migration(
        2,
        "skip index on message_id",
        # The API's message_id filter would otherwise read every granule of a customer.
        (AddIndex(TABLE, "idx_message_id message_id TYPE bloom_filter(0.01) GRANULARITY 4"),),
    ),
    Migration(
        3,
        "create audit_log",
        (
            # Append-only record of operator actions (policy changes, erasures, retention
            # changes). It holds who/what/when and a diff, never erased values.
            CreateTable(
                AUDIT_TABLE,
                """(
                    at DateTime64(3, 'UTC') DEFAULT now64(3),
                    audit_id UUID DEFAULT generateUUIDv7(),
                    actor String,
                    action LowCardinality(String),
                    customer_id String,
                    details String
                )""",
                "MergeTree",
                tail="ORDER BY (customer_id, at, audit_id)",
            ),
        ),
    ),
    Migration(
        4,
        "create retention_overrides",
        (
            # `mailmeta retention set` writes here; every sink reads it at start (and
            # periodically), so a changed retention survives restarts and reaches every
            # sink process. The customers file is the seed for customers without a row.
            CreateTable(
                RETENTION_TABLE,
                """(
                    customer_id String,
                    retention_days UInt16,
                    updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
                )""",
                "ReplacingMergeTree",
                engine_args="updated_at",
                tail="ORDER BY customer_id",
            ),
        ),
    ),
    Migration(
        5,
        "hourly aggregates",
        (
            CreateTable(
                HOURLY_TABLE,
                """(
                    customer_id LowCardinality(String),
                    hour DateTime('UTC'),
                    status LowCardinality(String),
                    messages UInt64,
                    bytes UInt64
                )""",
                "SummingMergeTree",
                tail=f"""
                PARTITION BY toYYYYMM(hour)
                ORDER BY (customer_id, hour, status)
                TTL hour + toIntervalDay({HOURLY_RETENTION_DAYS})
                """,
            ),
            # Backfill rows stored before this migration; guarded so a re-run after a crash
            # between this step and its ledger entry cannot count them twice. It runs before
            # the view exists and before the consumer starts, so nothing is counted twice.
            LegacyOnly(
                Statement(f"""
                INSERT INTO {HOURLY_TABLE}
                SELECT customer_id, toStartOfHour(received_at) AS hour, status,
                       count() AS messages, sum(ifNull(size_bytes, 0)) AS bytes
                FROM {TABLE} FINAL
                WHERE (SELECT count() FROM {HOURLY_TABLE}) = 0
                  AND NOT EXISTS (SELECT 1 FROM system.tables
                                  WHERE database = currentDatabase() AND name = '{HOURLY_VIEW}')
                GROUP BY customer_id, hour, status
                """)
            ),
            LegacyOnly(
                CreateView(
                    HOURLY_VIEW,
                    HOURLY_TABLE,
                    """SELECT customer_id, toStartOfHour(received_at) AS hour, status,
                       count() AS messages, sum(ifNull(size_bytes, 0)) AS bytes""",
                    TABLE,
                    "GROUP BY customer_id, hour, status",
                )
            ),
        ),
    ),
    Migration(
        6,
        "hourly stats count each event once",
        (
            # ReplacingMergeTree on the event: stats read it with FINAL, so each event
            # counts once whatever was inserted; policy_version keeps the newest copy, as
            # in the messages table. Duplicates share the key, hence the partition.
            CreateTable(
                HOURLY_EVENTS_TABLE,
                """(
                    customer_id LowCardinality(String),
                    hour DateTime('UTC'),
                    status LowCardinality(String),
                    event_id UUID,
                    bytes UInt64,
                    policy_version UInt32
                )""",
                "ReplacingMergeTree",
                engine_args="policy_version",
                tail=f"""
                PARTITION BY toYYYYMM(hour)
                ORDER BY (customer_id, hour, status, event_id)
                TTL hour + toIntervalDay({HOURLY_RETENTION_DAYS})
                SETTINGS merge_with_ttl_timeout = 3600
                """,
            ),
            CreateView(
                HOURLY_EVENTS_VIEW,
                HOURLY_EVENTS_TABLE,
                """SELECT customer_id, toStartOfHour(received_at) AS hour, status, event_id,
                      ifNull(size_bytes, 0) AS bytes, policy_version""",
                TABLE,
            ),
            # The old view stops counting only once the new one counts: nothing is missed.
            DropView(HOURLY_VIEW),
            # Backfill the stored events; a copy the new view also saw collapses with it,
            # so a re-run after a crash is harmless.
            InsertSelect(
                HOURLY_EVENTS_TABLE,
                f"""SELECT customer_id, toStartOfHour(received_at), status, event_id,
                       ifNull(size_bytes, 0), policy_version
                FROM {TABLE}""",
            ),
            # The summing table keeps only hours the new table cannot count (their rows
            # expired): stats read both, and no hour is in both.
            LegacyOnly(
                Statement(f"""
                ALTER TABLE {HOURLY_TABLE} DELETE WHERE (customer_id, hour) IN
                    (SELECT DISTINCT customer_id, hour FROM {HOURLY_EVENTS_TABLE})
                SETTINGS mutations_sync = 2
                """)
            ),
        ),
    ),
    Migration(
        7,
        "create erasure_log",
        (
            # scope 'all' (every event of the customer received before `at`), 'address'
            # or 'message_id' (events whose field holds one of `forms`). Forms are the
            # stored ones that matched rows, or hashes: never more than the rows held.
            CreateTable(
                ERASURE_LOG_TABLE,
                """(
                    customer_id String,
                    at DateTime64(3, 'UTC'),
                    scope LowCardinality(String),
                    forms Array(String)
                )""",
                "MergeTree",
                tail=f"""
                ORDER BY (customer_id, at)
                TTL toDateTime(at) + toIntervalDay({ERASURE_LOG_DAYS})
                SETTINGS merge_with_ttl_timeout = 3600
                """,
            ),
        ),
    ),
    Migration(
        8,
        "erased rows leave the disk at once",
        tuple(
            # A mutation (erasure, a shortened retention, a TTL merge) writes new parts and
            # leaves the old ones, erased rows included, for old_parts_lifetime (8 min on a
            # server): 0 lets the store remove them before an erasure returns (_core._purge).
            # The old parts are a server's guard against losing a merge it had not synced to
            # disk yet, so merged and mutated parts are synced instead.
            ModifySetting(t, "old_parts_lifetime = 0, min_rows_to_fsync_after_merge = 1")
            for t in (TABLE, HOURLY_EVENTS_TABLE, HOURLY_TABLE, ERASURE_LOG_TABLE, AUDIT_TABLE)
        ),
    ),
    Migration(
        9,
        "hourly stats exact without FINAL",
        (
            # The store writes the per-event hourly rows itself, only for events it has not
            # counted yet (ClickHouseStore._insert_rows): at most one row per event, so
            # the per-hour sums of a projection are exact and the stats read no FINAL.
            DropView(HOURLY_EVENTS_VIEW),
            # Copies counted before now collapse: one row per event from here on.
            OptimizeFinal(HOURLY_EVENTS_TABLE),
            # A projection on a ReplacingMergeTree must say what merges do with it: rebuilt
            # from the merged rows, it stays the sums of the table's rows.
            ModifySetting(HOURLY_EVENTS_TABLE, "deduplicate_merge_projection_mode = 'rebuild'"),
            Alter(
                HOURLY_EVENTS_TABLE,
                f"ADD PROJECTION IF NOT EXISTS {HOURLY_PROJECTION} (SELECT customer_id, hour, "
                "status, count(), sum(bytes) GROUP BY customer_id, hour, status)",
            ),
            Alter(
                HOURLY_EVENTS_TABLE,
                f"MATERIALIZE PROJECTION {HOURLY_PROJECTION} SETTINGS mutations_sync = 2",
            ),
        ),
    ),
    # --- 30-39: API tokens and access logs -------------------------------------------------
    Migration(
        30,
        "create api_tokens",
        (
            # One row per token state; a revocation writes a newer row (updated_at wins).
            # Only an argon2 hash of the secret is stored; the clear token is shown once.
            CreateTable(
                TOKENS_TABLE,
                """(
                    token_id String,
                    name String,
                    customer_id Nullable(String),
                    scopes Array(String),
                    secret_hash String,
                    created_at DateTime64(3, 'UTC'),
                    revoked_at Nullable(DateTime64(3, 'UTC')),
                    updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
                )""",
                "ReplacingMergeTree",
                engine_args="updated_at",
                tail="ORDER BY token_id",
            ),
        ),
    ),
    Migration(
        31,
        "create api_access_log",
        (
            # Request metadata only: no query string, no payload, never the token itself.
            CreateTable(
                ACCESS_LOG_TABLE,
                """(
                    at DateTime64(3, 'UTC'),
                    token_id String,
                    method LowCardinality(String),
                    route LowCardinality(String),
                    status UInt16,
                    latency_ms Float32
                )""",
                "MergeTree",
                tail=f"""
                PARTITION BY toYYYYMMDD(at)
                ORDER BY (token_id, at)
                TTL toDateTime(at) + toIntervalDay({ACCESS_LOG_RETENTION_DAYS})
                SETTINGS merge_with_ttl_timeout = 3600
                """,
            ),
        ),
    ),
    Migration(
        32,
        "skip index on event_id",
        # GET /v1/messages/{event_id} looks one event up inside a customer's rows.
        (AddIndex(TABLE, "idx_event_id event_id TYPE bloom_filter(0.01) GRANULARITY 4"),),
    ),
    # --- 40-49: webhooks (store/_webhooks.py) ------------------------------------------------
    Migration(
        40,
        "create webhook_endpoints and webhook_outbox",
        (
            # One row per endpoint state (a change or deletion is a newer row). The signing
            # secret must be kept in clear (HMAC), like the customers' hashing keys; the API
            # shows it once. previous_secret signs too until previous_until (rotation).
            CreateTable(
                WEBHOOK_ENDPOINTS_TABLE,
                """(
                    endpoint_id String,
                    customer_id String,
                    url String,
                    statuses Array(String),
                    active UInt8,
                    secret String,
                    previous_secret String,
                    previous_until DateTime64(3, 'UTC'),
                    created_at DateTime64(3, 'UTC'),
                    deleted UInt8,
                    updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
                )""",
                "ReplacingMergeTree",
                engine_args="updated_at",
                tail="ORDER BY endpoint_id",
            ),
            # The durable delivery queue: one row per (endpoint, event, replay) and state;
            # the webhook stage commits its offsets once a batch's rows are here. ver orders
            # the states (pending < delivered/failed), so a re-read event cannot turn a
            # delivered row pending again. The payload is the redacted event (what the
            # store keeps): it lives at most keep_days (the customer's retention, <= 8 d).
            CreateTable(
                WEBHOOK_OUTBOX_TABLE,
                """(
                    endpoint_id String,
                    event_id UUID,
                    replay_id String,
                    customer_id String,
                    chunk UInt64,
                    seq UInt32,
                    created_at DateTime64(3, 'UTC'),
                    payload String,
                    state LowCardinality(String),
                    attempts UInt32,
                    last_status UInt16,
                    last_error String,
                    webhook_id String,
                    settled_at Nullable(DateTime64(3, 'UTC')),
                    keep_days UInt16,
                    ver UInt64
                )""",
                "ReplacingMergeTree",
                engine_args="ver",
                tail="""
                ORDER BY (endpoint_id, event_id, replay_id)
                TTL toDateTime(created_at) + toIntervalDay(keep_days)
                SETTINGS merge_with_ttl_timeout = 3600
                """,
            ),
        ),
    ),
    Migration(
        20,
        "create policy_versions",
        (
            # Every redaction policy version of a customer (the policies topic keeps only
            # the latest): how a row stamped with a version was redacted.
            CreateTable(
                POLICY_VERSIONS_TABLE,
                """(
                    customer_id String,
                    version UInt32,
                    policy String,
                    actor String,
                    source LowCardinality(String),
                    at DateTime64(3, 'UTC') DEFAULT now64(3)
                )""",
                "ReplacingMergeTree",
                tail="ORDER BY (customer_id, version)",
            ),
        ),
    ),
)

# The migration ledger: which versions ran (a row written on any server counts).
LEDGER = CreateTable(
    LEDGER_TABLE,
    """(
        version UInt32,
        name String,
        applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
    )""",
    "ReplacingMergeTree",
    tail="ORDER BY version",
)


def applied_versions(query: Callable[[str], list[tuple[int, ...]]]) -> set[int]:
    return {int(r[0]) for r in query(f"SELECT version FROM {LEDGER_TABLE} FINAL")}


Command = Callable[..., object]


def migrate(
    command: Command,
    query: Callable[[str], list[tuple[int, ...]]],
    migrations: tuple[Migration, ...] = MIGRATIONS,
    layout: Layout = SINGLE_NODE,
) -> list[int]:
    """Apply the steps not yet recorded, in order; returns the versions applied now.

    On a cluster layout (store/_layout.py): ON CLUSTER DDL with IF NOT EXISTS, and the
    ledger replicated on every server, so several replicas running this at once only repeat
    idempotent steps, and a ledger row written anywhere counts.
    """
    for sql in LEDGER.ddl(layout):
        command(sql)
    done = applied_versions(query)
    known = max((m.version for m in migrations), default=0)
    if done and max(done) > known:
        # A newer mailmeta migrated this database; reading may still work, so warn only.
        log.warning("database schema version %s is newer than this code's %s", max(done), known)
    applied = []
    for m in sorted(migrations, key=lambda m: m.version):
        if m.version in done:
            continue
        for sql in m.ddl(layout):
            command(sql)
        command(
            f"INSERT INTO {LEDGER_TABLE} (version, name) SELECT {{v:UInt32}}, {{n:String}}",
            {"v": m.version, "n": m.name},
        )
        log.info("applied schema migration %s (%s)", m.version, m.name)
        applied.append(m.version)
    return applied
