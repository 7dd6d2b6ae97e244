"""Versioned schema migrations: an ordered list of steps, applied once each, recorded.

Every step is itself idempotent (IF NOT EXISTS), so a crash between running a step and
recording it, or two sinks starting at once against one server, is harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailmeta.store._cluster import Cluster

log = logging.getLogger("mailmeta.store")

TABLE = "messages"
AUDIT_TABLE = "audit_log"
RETENTION_TABLE = "retention_overrides"
HOURLY_TABLE = "messages_hourly"
HOURLY_VIEW = "messages_hourly_mv"
# Hourly counts hold no personal data: they outlive the rows they count (13 months, so a
# dashboard can compare a month with the same month last year), then expire by their TTL.
HOURLY_RETENTION_DAYS = 400
# Since migration 6: one row per event (its hour, status, size), so copies of an event
# (redelivery, a sink restart mid-batch, a retroactive rewrite) collapse instead of adding
# up. The event id is a random UUID minted at ingest: it names no person. The summing
# table above stays only for hours whose rows had expired before migration 6.
HOURLY_EVENTS_TABLE = "hourly_events"
HOURLY_EVENTS_VIEW = "hourly_events_mv"
# What was erased (customer, time, the stored forms matched), kept while a topic may still
# hold the erased events (the redacted topic keeps at most 7 days): every insert drops the
# events it names, so a replay cannot bring them back.
ERASURE_LOG_TABLE = "erasure_log"
ERASURE_LOG_DAYS = 8
TOKENS_TABLE = "api_tokens"
ACCESS_LOG_TABLE = "api_access_log"
ACCESS_LOG_RETENTION_DAYS = 30
POLICY_VERSIONS_TABLE = "policy_versions"
LEDGER_TABLE = "schema_migrations"
WEBHOOK_ENDPOINTS_TABLE = "webhook_endpoints"
WEBHOOK_OUTBOX_TABLE = "webhook_outbox"

# Version ranges, so work on separate features never collides on a number:
#   1-19 messages and storage; 20-29 redaction policies; 30-39 API tokens and access logs;
#   40-49 webhooks.


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "create messages",
        (
            # ReplacingMergeTree on (customer_id, received_at, event_id): a redelivered event
            # has the same key and collapses to one row; policy_version as the version keeps
            # the copy redacted by the newest policy. Rows expire by their own retention.
            f"""
            CREATE TABLE IF NOT EXISTS {TABLE}
            (
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
            )
            ENGINE = ReplacingMergeTree(policy_version)
            PARTITION BY toYYYYMM(received_at)
            ORDER BY (customer_id, received_at, event_id)
            TTL received_at + toIntervalDay(retention_days)
            SETTINGS merge_with_ttl_timeout = 3600
            """,
        ),
    ),
    Migration(
        2,
        "skip index on message_id",
        (
            # The API's message_id filter would otherwise read every granule of a customer.
            f"ALTER TABLE {TABLE} ADD INDEX IF NOT EXISTS idx_message_id message_id "
            "TYPE bloom_filter(0.01) GRANULARITY 4",
        ),
    ),
    Migration(
        3,
        "create audit_log",
        (
            # Append-only record of operator actions (policy changes, erasures, retention
            # changes). It holds who/what/when and a diff, never erased values.
            f"""
            CREATE TABLE IF NOT EXISTS {AUDIT_TABLE}
            (
                at DateTime64(3, 'UTC') DEFAULT now64(3),
                audit_id UUID DEFAULT generateUUIDv7(),
                actor String,
                action LowCardinality(String),
                customer_id String,
                details String
            )
            ENGINE = MergeTree
            ORDER BY (customer_id, at, audit_id)
            """,
        ),
    ),
    Migration(
        4,
        "create retention_overrides",
        (
            # `mailmeta retention set` writes here; every sink reads it at start (and
            # periodically), so a changed retention survives restarts and reaches every
            # sink process. The customers file is the seed for customers without a row.
            f"""
            CREATE TABLE IF NOT EXISTS {RETENTION_TABLE}
            (
                customer_id String,
                retention_days UInt16,
                updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
            )
            ENGINE = ReplacingMergeTree(updated_at)
            ORDER BY customer_id
            """,
        ),
    ),
    Migration(
        5,
        "hourly aggregates",
        (
            f"""
            CREATE TABLE IF NOT EXISTS {HOURLY_TABLE}
            (
                customer_id LowCardinality(String),
                hour DateTime('UTC'),
                status LowCardinality(String),
                messages UInt64,
                bytes UInt64
            )
            ENGINE = SummingMergeTree
            PARTITION BY toYYYYMM(hour)
            ORDER BY (customer_id, hour, status)
            TTL hour + toIntervalDay({HOURLY_RETENTION_DAYS})
            """,
            # Backfill rows stored before this migration; guarded so a re-run after a crash
            # between this step and its ledger entry cannot count them twice. It runs before
            # the view exists and before the consumer starts, so nothing is counted twice.
            f"""
            INSERT INTO {HOURLY_TABLE}
            SELECT customer_id, toStartOfHour(received_at) AS hour, status,
                   count() AS messages, sum(ifNull(size_bytes, 0)) AS bytes
            FROM {TABLE} FINAL
            WHERE (SELECT count() FROM {HOURLY_TABLE}) = 0
              AND NOT EXISTS (SELECT 1 FROM system.tables
                              WHERE database = currentDatabase() AND name = '{HOURLY_VIEW}')
            GROUP BY customer_id, hour, status
            """,
            f"""
            CREATE MATERIALIZED VIEW IF NOT EXISTS {HOURLY_VIEW} TO {HOURLY_TABLE} AS
            SELECT customer_id, toStartOfHour(received_at) AS hour, status,
                   count() AS messages, sum(ifNull(size_bytes, 0)) AS bytes
            FROM {TABLE}
            GROUP BY customer_id, hour, status
            """,
        ),
    ),
    Migration(
        6,
        "hourly stats count each event once",
        (
            # ReplacingMergeTree on the event: stats read it with FINAL, so each event
            # counts once whatever was inserted; policy_version keeps the newest copy, as
            # in the messages table. Duplicates share the key, hence the partition.
            f"""
            CREATE TABLE IF NOT EXISTS {HOURLY_EVENTS_TABLE}
            (
                customer_id LowCardinality(String),
                hour DateTime('UTC'),
                status LowCardinality(String),
                event_id UUID,
                bytes UInt64,
                policy_version UInt32
            )
            ENGINE = ReplacingMergeTree(policy_version)
            PARTITION BY toYYYYMM(hour)
            ORDER BY (customer_id, hour, status, event_id)
            TTL hour + toIntervalDay({HOURLY_RETENTION_DAYS})
            SETTINGS merge_with_ttl_timeout = 3600
            """,
            f"""
            CREATE MATERIALIZED VIEW IF NOT EXISTS {HOURLY_EVENTS_VIEW} TO {HOURLY_EVENTS_TABLE}
            AS SELECT customer_id, toStartOfHour(received_at) AS hour, status, event_id,
                      ifNull(size_bytes, 0) AS bytes, policy_version
            FROM {TABLE}
            """,
            # The old view stops counting only once the new one counts: nothing is missed.
            f"DROP VIEW IF EXISTS {HOURLY_VIEW}",
            # Backfill the stored events; a copy the new view also saw collapses with it,
            # so a re-run after a crash is harmless.
            f"""
            INSERT INTO {HOURLY_EVENTS_TABLE}
            SELECT customer_id, toStartOfHour(received_at), status, event_id,
                   ifNull(size_bytes, 0), policy_version
            FROM {TABLE}
            """,
            # The summing table keeps only hours the new table cannot count (their rows
            # expired): stats read both, and no hour is in both.
            f"""
            ALTER TABLE {HOURLY_TABLE} DELETE WHERE (customer_id, hour) IN
                (SELECT DISTINCT customer_id, hour FROM {HOURLY_EVENTS_TABLE})
            SETTINGS mutations_sync = 2
            """,
        ),
    ),
    Migration(
        7,
        "create erasure_log",
        (
            # scope 'all' (every event of the customer received before `at`), 'address'
            # or 'message_id' (events whose field holds one of `forms`). Forms are the
            # stored ones that matched rows, or hashes: never more than the rows held.
            f"""
            CREATE TABLE IF NOT EXISTS {ERASURE_LOG_TABLE}
            (
                customer_id String,
                at DateTime64(3, 'UTC'),
                scope LowCardinality(String),
                forms Array(String)
            )
            ENGINE = MergeTree
            ORDER BY (customer_id, at)
            TTL toDateTime(at) + toIntervalDay({ERASURE_LOG_DAYS})
            SETTINGS merge_with_ttl_timeout = 3600
            """,
        ),
    ),
    Migration(
        8,
        "erased rows leave the disk at once",
        tuple(
            # A mutation (erasure, a shortened retention, a TTL merge) writes new parts and
            # leaves the old ones, erased rows included, for old_parts_lifetime (8 min on a
            # server): 0 lets the store remove them before an erasure returns (store/_purge.py).
            # The old parts are a server's guard against losing a merge it had not synced to
            # disk yet, so merged and mutated parts are synced instead.
            f"ALTER TABLE {t} MODIFY SETTING old_parts_lifetime = 0, "
            "min_rows_to_fsync_after_merge = 1"
            for t in (TABLE, HOURLY_EVENTS_TABLE, HOURLY_TABLE, ERASURE_LOG_TABLE, AUDIT_TABLE)
        ),
    ),
    # --- 30-39: API tokens and access logs -------------------------------------------------
    Migration(
        30,
        "create api_tokens",
        (
            # One row per token state; a revocation writes a newer row (updated_at wins).
            # Only an argon2 hash of the secret is stored; the clear token is shown once.
            f"""
            CREATE TABLE IF NOT EXISTS {TOKENS_TABLE}
            (
                token_id String,
                name String,
                customer_id Nullable(String),
                scopes Array(String),
                secret_hash String,
                created_at DateTime64(3, 'UTC'),
                revoked_at Nullable(DateTime64(3, 'UTC')),
                updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
            )
            ENGINE = ReplacingMergeTree(updated_at)
            ORDER BY token_id
            """,
        ),
    ),
    Migration(
        31,
        "create api_access_log",
        (
            # Request metadata only: no query string, no payload, never the token itself.
            f"""
            CREATE TABLE IF NOT EXISTS {ACCESS_LOG_TABLE}
            (
                at DateTime64(3, 'UTC'),
                token_id String,
                method LowCardinality(String),
                route LowCardinality(String),
                status UInt16,
                latency_ms Float32
            )
            ENGINE = MergeTree
            PARTITION BY toYYYYMMDD(at)
            ORDER BY (token_id, at)
            TTL toDateTime(at) + toIntervalDay({ACCESS_LOG_RETENTION_DAYS})
            SETTINGS merge_with_ttl_timeout = 3600
            """,
        ),
    ),
    Migration(
        32,
        "skip index on event_id",
        (
            # GET /v1/messages/{event_id} looks one event up inside a customer's rows.
            f"ALTER TABLE {TABLE} ADD INDEX IF NOT EXISTS idx_event_id event_id "
            "TYPE bloom_filter(0.01) GRANULARITY 4",
        ),
    ),
    # --- 40-49: webhooks (store/_webhooks.py) ------------------------------------------------
    Migration(
        40,
        "create webhook_endpoints and webhook_outbox",
        (
            # One row per endpoint state (a change or deletion is a newer row). The signing
            # secret must be kept in clear (HMAC), like the customers' hashing keys; the API
            # shows it once. previous_secret signs too until previous_until (rotation).
            f"""
            CREATE TABLE IF NOT EXISTS {WEBHOOK_ENDPOINTS_TABLE}
            (
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
            )
            ENGINE = ReplacingMergeTree(updated_at)
            ORDER BY endpoint_id
            """,
            # The durable delivery queue: one row per (endpoint, event, replay) and state;
            # the webhook stage commits its offsets once a batch's rows are here. ver orders
            # the states (pending < delivered/failed), so a re-read event cannot turn a
            # delivered row pending again. The payload is the redacted event (what the
            # store keeps): it lives at most keep_days (the customer's retention, <= 8 d).
            f"""
            CREATE TABLE IF NOT EXISTS {WEBHOOK_OUTBOX_TABLE}
            (
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
            )
            ENGINE = ReplacingMergeTree(ver)
            ORDER BY (endpoint_id, event_id, replay_id)
            TTL toDateTime(created_at) + toIntervalDay(keep_days)
            SETTINGS merge_with_ttl_timeout = 3600
            """,
        ),
    ),
    Migration(
        20,
        "create policy_versions",
        (
            # Every redaction policy version of a customer (the policies topic keeps only
            # the latest): how a row stamped with a version was redacted.
            f"""
            CREATE TABLE IF NOT EXISTS {POLICY_VERSIONS_TABLE}
            (
                customer_id String,
                version UInt32,
                policy String,
                actor String,
                source LowCardinality(String),
                at DateTime64(3, 'UTC') DEFAULT now64(3)
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (customer_id, version)
            """,
        ),
    ),
)

_CREATE_LEDGER = f"""
CREATE TABLE IF NOT EXISTS {LEDGER_TABLE}
(
    version UInt32,
    name String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY version
"""


def applied_versions(query: Callable[[str], list[tuple[int, ...]]]) -> set[int]:
    return {int(r[0]) for r in query(f"SELECT version FROM {LEDGER_TABLE} FINAL")}


Command = Callable[..., object]


def migrate(
    command: Command,
    query: Callable[[str], list[tuple[int, ...]]],
    migrations: tuple[Migration, ...] = MIGRATIONS,
    cluster: Cluster | None = None,
) -> list[int]:
    """Apply the steps not yet recorded, in order; returns the versions applied now.

    With ``cluster``, each step in its cluster form (store/_cluster.py): ON CLUSTER DDL with
    IF NOT EXISTS, and the ledger replicated on every server, so several replicas running
    this at once only repeat idempotent steps, and a ledger row written anywhere counts.
    """
    for sql in cluster.statement(_CREATE_LEDGER) if cluster else (_CREATE_LEDGER,):
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
        for sql in cluster.migration(m).statements if cluster else m.statements:
            command(sql)
        command(
            f"INSERT INTO {LEDGER_TABLE} (version, name) SELECT {{v:UInt32}}, {{n:String}}",
            {"v": m.version, "n": m.name},
        )
        log.info("applied schema migration %s (%s)", m.version, m.name)
        applied.append(m.version)
    return applied
