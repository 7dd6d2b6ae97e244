"""ClickHouseStore: the Store on clickhouse-connect, for embedded chdb and for a server.

``chdb:///abs/dir`` runs ClickHouse in this process (one process owns the directory);
``http(s)://user:pass@host:port/db`` talks to a server. Everything above get_client is shared.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from clickhouse_connect.driver.client import Client

from mailmeta.schema import Event, format_time
from mailmeta.store._base import MAX_LIMIT, StoreError, UnstorableEvent
from mailmeta.store._core import FINAL_SETTINGS, VISIBLE
from mailmeta.store._erasure import ErasureMixin, Erasures
from mailmeta.store._layout import SINGLE_NODE, Cluster
from mailmeta.store._migrations import MIGRATIONS, applied_versions, migrate
from mailmeta.store._policies import PolicyStoreMixin
from mailmeta.store._protocol import PreparedBatch
from mailmeta.store._reads import ReadsMixin
from mailmeta.store._retention import RetentionMixin
from mailmeta.store._rows import (
    arrow_from_json,
    check,
    to_arrow,
)
from mailmeta.store._search import SearchFilter, SearchMixin
from mailmeta.store._tables import AUDIT_TABLE, HOURLY_EVENTS_TABLE, TABLE
from mailmeta.store._tokens import TokensMixin
from mailmeta.store._webhooks import WebhooksMixin

log = logging.getLogger("mailmeta.store")

# The longest retention a customer may have (config caps it); bounds the time-range filter.
MAX_RETENTION_DAYS = 3650

# The per-event hourly rows the store writes (migration 9): one per event, its first copy.
_HOUR = pa.timestamp("s", tz="UTC")
HOURLY_ARROW_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("hour", _HOUR),
        ("status", pa.string()),
        ("event_id", pa.binary(16)),
        ("bytes", pa.uint64()),
        ("policy_version", pa.uint32()),
    ]
)
# Event ids per "already counted?" query (bound as one Array(UUID) parameter).
_IDS_PER_CHECK = 100_000

_VISIBLE = VISIBLE
_FINAL_SETTINGS = FINAL_SETTINGS


def safe_dsn(dsn: str) -> str:
    """The DSN without its password, for logs and errors."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def chdb_path(dsn: str) -> Path | None:
    # The path without a query (``?database=…`` picks a database in it).
    return Path(urlsplit(dsn).path) if dsn.startswith("chdb://") else None


class ClickHouseStore(
    RetentionMixin,
    ErasureMixin,
    ReadsMixin,
    SearchMixin,
    TokensMixin,
    PolicyStoreMixin,
    WebhooksMixin,
):
    """A Store on ClickHouse. Thread-safe: a small pool gives each caller its own client."""

    def __init__(
        self,
        dsn: str,
        retention_days: Mapping[str, int] | None = None,
        *,
        apply_migrations: bool = True,
        cluster: str | Cluster = "",
    ) -> None:
        """``cluster``: the ClickHouse cluster to create and use the schema on (cluster mode,
        store/_layout.py; the caller passes MAILMETA_CLICKHOUSE_CLUSTER), "" means one server."""
        self.dsn = dsn
        self._cluster = (
            Cluster(cluster) if isinstance(cluster, str) and cluster else cluster or None
        )
        self._layout = self._cluster or SINGLE_NODE
        # The customers file's values; overrides from `retention set` apply on top.
        self._seed_retention = dict(retention_days or {})
        self._retention = dict(self._seed_retention)
        self._write_lock = threading.RLock()
        self._window_hint: dict[tuple[str, bool], int] = {}
        self._erasure_log: dict[str, Erasures] = {}
        self._cond = threading.Condition()
        self._idle: list[Client] = []
        self._all: list[Client] = []
        self._in_use = 0
        self._closed = False
        path = chdb_path(dsn)
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
        try:
            # Open one client now so a wrong DSN or a chdb dir locked by another process
            # fails here, with the reason, and not at the first event.
            with self._client() as client:
                client.query("SELECT 1")
            if apply_migrations:
                self.migrate()
                self.load_retention_overrides()
        except BaseException:
            self.close()
            raise

    # --- clients ---------------------------------------------------------------------------

    def _new_client(self) -> Client:
        try:
            if self.dsn.startswith("chdb://"):
                return clickhouse_connect.get_client(dsn=self.dsn)
            # No session: pooled clients may then share server-side state freely.
            return clickhouse_connect.get_client(dsn=self.dsn, autogenerate_session_id=False)
        except Exception as exc:
            raise StoreError(f"cannot open ClickHouse at {safe_dsn(self.dsn)}: {exc}") from exc

    @contextmanager
    def _client(self) -> Iterator[Client]:
        with self._cond:
            if self._closed:
                raise StoreError("store is closed")
            client = self._idle.pop() if self._idle else None
            self._in_use += 1
        try:
            if client is None:
                client = self._new_client()
                with self._cond:
                    self._all.append(client)
            yield client
        finally:
            with self._cond:
                self._in_use -= 1
                if client is not None:
                    self._idle.append(client)
                self._cond.notify_all()

    def _command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> object:
        with self._client() as c:
            try:
                return c.command(sql, parameters=dict(parameters) if parameters else None)
            except Exception as exc:
                raise StoreError(f"ClickHouse command failed: {exc}") from exc

    def _rows(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[Any]:
        with self._client() as c:
            try:
                result = c.query(sql, parameters=dict(parameters) if parameters else None)
            except Exception as exc:
                raise StoreError(f"ClickHouse query failed: {exc}") from exc
            return list(result.result_rows)

    # --- schema ------------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply pending schema migrations; returns the versions applied (empty: none due)."""
        self._check_layout()
        return migrate(self._command, self._rows, MIGRATIONS, self._layout)

    def _check_layout(self) -> None:
        """Refuse a database laid out for the other mode: queries would miss the tables."""
        rows = self._rows(
            "SELECT engine FROM system.tables WHERE database = currentDatabase() "
            "AND name = {t:String}",
            {"t": TABLE},
        )
        if not rows:
            return
        distributed = rows[0][0] == "Distributed"
        if self._cluster is not None and not distributed:
            raise StoreError(
                f"MAILMETA_CLICKHOUSE_CLUSTER={self._cluster.name}, but this database holds a "
                "single-server schema: cluster mode needs a database created in cluster mode"
            )
        if self._cluster is None and distributed:
            raise StoreError(
                "this database holds a cluster schema (Distributed tables): "
                "set MAILMETA_CLICKHOUSE_CLUSTER to the cluster's name"
            )

    def schema_version(self) -> int:
        return max(applied_versions(self._rows), default=0)

    # --- Store -------------------------------------------------------------------------------

    def check_event(self, event: Event) -> str | None:
        try:
            check(event, self._retention)
        except UnstorableEvent as exc:
            return str(exc)
        return None

    def insert_events(self, events: Sequence[Event]) -> int:
        if not events:
            return 0
        self._refresh_retention()
        # A duplicate within one batch (redelivery) would be counted twice by the hourly
        # aggregates; keep the copy redacted by the newest policy, as the table would.
        unique: dict[str, Event] = {}
        for ev in events:
            seen = unique.get(ev.event_id)
            if seen is None or (ev.policy_version or 0) > (seen.policy_version or 0):
                unique[ev.event_id] = ev
        if len(unique) < len(events):
            events = list(unique.values())
        # The lock orders inserts against retention changes and erasures (see _retention).
        with self._write_lock:
            table = to_arrow(events, self._retention)  # UnstorableEvent before any write
            return self._insert_rows(table)

    def prepare_json(self, values: Sequence[bytes]) -> PreparedBatch | None:
        """Schema-v1 JSON records decoded and checked columnwise, for insert_prepared.

        Apart from the insert so the sink can decode one batch while the one before is
        inserted. None when the batch needs per-event handling (a bad record, a
        non-canonical value, a duplicate): then decode_event, check_event and insert_events
        name the bad records and insert the rest. ~10x faster per record.
        """
        self._refresh_retention()
        retention = dict(self._retention)
        table = arrow_from_json(values, retention)
        return None if table is None else PreparedBatch(values, retention, table)

    def insert_prepared(self, prepared: PreparedBatch) -> int | None:
        """Insert a prepare_json result; None, having written nothing, when a retention
        change since then makes the batch need per-event handling after all."""
        with self._write_lock:  # as in insert_events: retention read and insert together
            table: pa.Table | None = prepared.table
            if prepared.retention != self._retention:
                # A retention change since it was prepared: rebuild with the value in force.
                table = arrow_from_json(prepared.values, self._retention)
                if table is None:
                    return None
            return self._insert_rows(table)

    def _insert_rows(self, table: pa.Table) -> int:
        """Store a batch of distinct events (ARROW_SCHEMA; call with the write lock held):
        the rows, then the per-event hourly rows of the events not counted yet.

        Deduplicated here, at insert, so the stats read hourly_events without FINAL (its
        projection's per-hour sums): an event is counted by its first stored copy, and a
        copy (redelivery, a sink restart mid-batch, a retroactive rewrite) finds it counted.
        The rows go first: a crash between the two inserts leaves the event uncounted until
        its redelivery counts it, never counted twice.
        """
        table = self._without_erased(table)
        if not table.num_rows:
            return 0
        settings = self._insert_settings()
        with self._client() as c:
            try:
                c.insert_arrow(TABLE, table, settings=settings)
                hourly = self._uncounted(table)
                if hourly.num_rows:
                    c.insert_arrow(HOURLY_EVENTS_TABLE, hourly, settings=settings)
            except StoreError:
                raise
            except Exception as exc:
                raise StoreError(f"insert of {table.num_rows} rows failed: {exc}") from exc
        return int(table.num_rows)

    def _uncounted(self, table: pa.Table) -> pa.Table:
        """The hourly rows (HOURLY_ARROW_SCHEMA) of the batch's events the stats lack."""
        hour = pc.floor_temporal(table["received_at"], 1, "hour").cast(_HOUR)
        ids = table["event_id"].to_pylist()
        counted: set[bytes] = set()
        for i in range(0, len(ids), _IDS_PER_CHECK):
            chunk = ids[i : i + _IDS_PER_CHECK]
            counted.update(
                r[0].bytes
                for r in self._rows(
                    f"SELECT event_id FROM {HOURLY_EVENTS_TABLE} "
                    "WHERE customer_id IN {c:Array(String)} "
                    "AND hour BETWEEN {lo:DateTime('UTC')} AND {hi:DateTime('UTC')} "
                    "AND event_id IN {ids:Array(UUID)}",
                    {
                        "c": pc.unique(table["customer_id"]).to_pylist(),
                        "lo": pc.min(hour).as_py(),
                        "hi": pc.max(hour).as_py(),
                        "ids": [str(uuid.UUID(bytes=b)) for b in chunk],
                    },
                )
            )
        hourly = pa.Table.from_arrays(
            [
                table["customer_id"],
                hour,
                table["status"],
                table["event_id"],
                pc.fill_null(table["size_bytes"], 0),
                table["policy_version"],
            ],
            schema=HOURLY_ARROW_SCHEMA,
        )
        if counted:
            fresh = pc.invert(pc.is_in(table["event_id"], pa.array(counted, pa.binary(16))))
            hourly = hourly.filter(fresh)
        return hourly

    def _days(self, customer: str | None) -> int:
        if customer is None:
            return MAX_RETENTION_DAYS
        return min(self._retention.get(customer, MAX_RETENTION_DAYS), MAX_RETENTION_DAYS)

    def query_messages(
        self, customer: str, message_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be 1..{MAX_LIMIT}")
        # The dashboard's search: one query path, with its bounded look-back (see there).
        flt = SearchFilter(message_ids=(message_id,)) if message_id is not None else SearchFilter()
        return self.search_events(customer, flt, limit)[0]

    def count(self, customer: str | None = None, *, visible_only: bool = False) -> int:
        params: dict[str, Any] = {}
        clauses = []
        if customer is not None:
            clauses.append("customer_id = {customer:String}")
            params["customer"] = customer
        if visible_only:
            clauses.append(_VISIBLE)
            params["days"] = self._days(customer)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        final = " FINAL" if visible_only else ""
        sql = f"SELECT count() FROM {TABLE}{final}{where}"
        if visible_only:
            sql += _FINAL_SETTINGS
        return int(self._rows(sql, params)[0][0])

    # --- audit -------------------------------------------------------------------------------

    def append_audit(
        self, actor: str, action: str, customer_id: str, details: Mapping[str, Any]
    ) -> None:
        self._command(
            f"INSERT INTO {AUDIT_TABLE} (actor, action, customer_id, details) "
            "SELECT {a:String}, {act:String}, {c:String}, {d:String}",
            {"a": actor, "act": action, "c": customer_id, "d": orjson.dumps(details).decode()},
        )

    def read_audit(self, customer: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be 1..{MAX_LIMIT}")
        params: dict[str, Any] = {"limit": limit}
        where = ""
        if customer is not None:
            where = " WHERE customer_id = {c:String}"
            params["c"] = customer
        rows = self._rows(
            f"SELECT at, toString(audit_id), actor, action, customer_id, details FROM {AUDIT_TABLE}"
            f"{where} ORDER BY at DESC, audit_id DESC LIMIT {{limit:UInt32}}",
            params,
        )
        return [
            {
                "at": format_time(at),
                "audit_id": aid,
                "actor": actor,
                "action": action,
                "customer_id": cid,
                "details": orjson.loads(details),
            }
            for at, aid, actor, action, cid, details in rows
        ]

    def erase_audit(self, customer: str) -> int:
        params = {"c": customer}
        where = "customer_id = {c:String}"
        with self._write_lock:
            n = int(self._rows(f"SELECT count() FROM {AUDIT_TABLE} WHERE {where}", params)[0][0])
            if n:
                self._delete(AUDIT_TABLE, where, params)
            self._purge([AUDIT_TABLE])
        return n

    def force_ttl_merge(self) -> None:
        # MATERIALIZE TTL recomputes expiry of existing parts; OPTIMIZE FINAL then merges
        # each partition, which drops expired rows and collapses duplicates.
        self._command(
            f"ALTER TABLE {self._alter(TABLE)} MATERIALIZE TTL SETTINGS mutations_sync = 2"
        )
        self._command(f"OPTIMIZE TABLE {self._alter(TABLE)} FINAL")
        self._purge([TABLE])  # the merged-away parts held the expired rows

    def ping(self) -> bool:
        try:
            return bool(self._rows("SELECT 1"))
        except StoreError:
            return False

    def close(self, timeout: float = 5.0) -> None:
        """Close every client, after waiting (bounded) for the ones in use to come back."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            while self._in_use and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if self._in_use:
                log.warning("closing ClickHouse clients while %s are still in use", self._in_use)
            clients, self._all, self._idle = self._all, [], []
        for client in clients:
            try:
                client.close()
            except Exception as exc:  # closing must reach every client
                log.warning("closing a ClickHouse client failed: %s", exc)

    def __enter__(self) -> ClickHouseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
