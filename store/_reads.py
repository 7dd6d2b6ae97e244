"""Reads for dashboards and export: hourly stats and bounded export pages."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from mailmeta.schema import format_time
from mailmeta.store._core import FINAL_SETTINGS, VISIBLE, StoreCore, ms
from mailmeta.store._rows import SELECT_COLUMNS, row_to_message
from mailmeta.store._tables import HOURLY_EVENTS_TABLE, HOURLY_TABLE, TABLE

_COLS = ", ".join(SELECT_COLUMNS)
EXPORT_PAGE = 5000


def _range(params: dict[str, Any], since: datetime | None, until: datetime | None) -> str:
    sql = ""
    if since is not None:
        sql += " AND received_at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')"
        params["since"] = ms(since)
    if until is not None:
        sql += " AND received_at < fromUnixTimestamp64Milli({until:Int64}, 'UTC')"
        params["until"] = ms(until)
    return sql


class ReadsMixin(StoreCore):
    def hourly_stats(self, customer: str, since: datetime, until: datetime) -> list[dict[str, Any]]:
        """Event counts and bytes per hour and status, each event counted once.

        hourly_events holds one row per event (the store counts an event's first copy
        only, store/_clickhouse.py ``_insert_rows``), so its projection's per-hour sums are
        exact without FINAL. The summing table holds only hours from before per-event
        counting whose rows had expired.
        """
        hours = (
            "customer_id = {c:String} "
            "AND hour >= toStartOfHour(fromUnixTimestamp64Milli({since:Int64}, 'UTC')) "
            "AND hour < fromUnixTimestamp64Milli({until:Int64}, 'UTC')"
        )
        rows = self._rows(
            "SELECT hour, status, sum(n), sum(b) FROM ("
            f"SELECT hour, status, count() AS n, sum(bytes) AS b FROM {HOURLY_EVENTS_TABLE} "
            f"WHERE {hours} GROUP BY hour, status UNION ALL "
            f"SELECT hour, status, sum(messages), sum(bytes) FROM {HOURLY_TABLE} "
            f"WHERE {hours} GROUP BY hour, status"
            ") GROUP BY hour, status ORDER BY hour, status",
            {"c": customer, "since": ms(since), "until": ms(until)},
        )
        return [
            {"hour": format_time(h), "status": s, "messages": int(n), "bytes": int(b)}
            for h, s, n, b in rows
        ]

    def count_export(
        self, customer: str, since: datetime | None = None, until: datetime | None = None
    ) -> int:
        params: dict[str, Any] = {"c": customer, "days": self._days(customer)}
        where = f"customer_id = {{c:String}} AND {VISIBLE}" + _range(params, since, until)
        return int(
            self._rows(f"SELECT count() FROM {TABLE} FINAL WHERE {where}" + FINAL_SETTINGS, params)[
                0
            ][0]
        )

    def export_pages(
        self,
        customer: str,
        since: datetime | None = None,
        until: datetime | None = None,
        page: int = EXPORT_PAGE,
    ) -> Iterator[list[dict[str, Any]]]:
        """The customer's visible events, oldest first, in pages of at most ``page``.

        Keyset pagination on the sorting key: each page is one bounded query, so memory
        stays bounded however many rows there are, in embedded and server mode alike.
        """
        base: dict[str, Any] = {"c": customer, "days": self._days(customer), "page": page}
        where = f"customer_id = {{c:String}} AND {VISIBLE}" + _range(base, since, until)
        after = ""
        params = dict(base)
        while True:
            rows = self._rows(
                f"SELECT {_COLS}, toUnixTimestamp64Milli(received_at) FROM {TABLE} FINAL "
                f"WHERE {where}{after} ORDER BY received_at, event_id LIMIT {{page:UInt32}}"
                + FINAL_SETTINGS,
                params,
            )
            if not rows:
                return
            yield [row_to_message(r[:-1]) for r in rows]
            if len(rows) < page:
                return
            last = rows[-1]
            params = dict(base, at=int(last[-1]), eid=str(last[0]))
            t = "fromUnixTimestamp64Milli({at:Int64}, 'UTC')"
            after = f" AND received_at >= {t} AND (received_at > {t} OR event_id > toUUID({{eid:String}}))"
