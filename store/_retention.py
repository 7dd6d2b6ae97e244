"""Per-customer retention: the customers file seeds it, `retention set` overrides it.

Overrides live in ClickHouse (``retention_overrides``), so they survive restarts and every
sink process learns them: at open, and again at most every ``REFRESH_S`` seconds before an
insert. A change rewrites the customer's stored rows (their ``retention_days``, hence their
TTL) and physically removes the rows a shorter retention has already expired.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from mailmeta.store._base import RetentionChange, StoreError
from mailmeta.store._core import StoreCore, ms
from mailmeta.store._tables import RETENTION_TABLE, TABLE

log = logging.getLogger("mailmeta.store")

# How stale another process's retention change may be in this one (server mode, many sinks).
REFRESH_S = 10.0
MIN_DAYS, MAX_DAYS = 1, 3650


class RetentionMixin(StoreCore):
    _retention_loaded_at: float = 0.0

    def retention(self) -> dict[str, int]:
        """The retention (days) in force per customer."""
        return dict(self._retention)

    def load_retention_overrides(self) -> None:
        """Re-read the overrides; a customer without one keeps its seed (config) value."""
        rows = self._rows(
            f"SELECT customer_id, argMax(retention_days, updated_at) FROM {RETENTION_TABLE} "
            "GROUP BY customer_id"
        )
        merged = dict(self._seed_retention)
        for customer, days in rows:
            # Only configured customers: an override alone must not make events storable.
            if customer in merged:
                merged[customer] = int(days)
        with self._write_lock:
            self._retention = merged
        self._retention_loaded_at = time.monotonic()

    def _refresh_retention(self) -> None:
        if time.monotonic() - self._retention_loaded_at < REFRESH_S:
            return
        try:
            self.load_retention_overrides()
        except StoreError as exc:  # keep the last known values; the insert itself will tell
            log.warning("could not refresh retention overrides: %s", exc)
            self._retention_loaded_at = time.monotonic()

    def set_retention(self, customer: str, days: int) -> RetentionChange:
        """Record ``days`` for ``customer`` and apply it to future and stored rows."""
        if customer not in self._seed_retention:
            raise KeyError(customer)
        if not MIN_DAYS <= days <= MAX_DAYS:
            raise ValueError(f"days must be {MIN_DAYS}..{MAX_DAYS}")
        # "Now" bound once: the count and the deletion agree, and a replicated table
        # (cluster mode) refuses a mutation calling now64().
        params = {"c": customer, "d": days, "now": ms(datetime.now(UTC))}
        # Held against insert_events: no batch built with the old value can land after the
        # rewrite below and keep it.
        with self._write_lock:
            previous = self._retention[customer]
            self._command(
                f"INSERT INTO {RETENTION_TABLE} (customer_id, retention_days) "
                "SELECT {c:String}, {d:UInt16}",
                params,
            )
            self._retention[customer] = days
            where = "customer_id = {c:String}"
            expired_where = (
                f"{where} AND received_at + toIntervalDay({{d:UInt16}}) "
                "<= fromUnixTimestamp64Milli({now:Int64}, 'UTC')"
            )
            expired = int(
                self._rows(f"SELECT count() FROM {TABLE} WHERE {expired_where}", params)[0][0]
            )
            if expired:
                # Physically, now: a shortened promise must not wait for a TTL merge.
                self._delete(TABLE, expired_where, params)
            stale = f"{where} AND retention_days != {{d:UInt16}}"
            updated = int(self._rows(f"SELECT count() FROM {TABLE} WHERE {stale}", params)[0][0])
            if updated:
                # Rewriting retention_days recomputes each part's TTL (ClickHouse does this
                # for mutations of columns the TTL expression reads).
                self._command(
                    f"ALTER TABLE {self._alter(TABLE)} UPDATE retention_days = {{d:UInt16}} "
                    f"WHERE {stale} "
                    "SETTINGS mutations_sync = 2",
                    params,
                )
            # The parts the mutations replaced still hold the expired rows: off the disk too.
            self._purge([TABLE])
        return RetentionChange(customer, previous, days, updated, expired)
