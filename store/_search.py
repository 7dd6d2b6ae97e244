"""Dashboard search (a ClickHouseStore mixin): filtered events, newest first, keyset pages.

Pages are keyed on the sorting key (received_at, event_id), descending: a page is "the next
``limit`` events strictly older than the cursor", so events inserted while someone pages
(newer ones above, or older ones anywhere) never shift or repeat what a later page returns.
Every value travels as a bound parameter; only constant SQL is composed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from mailmeta.store._core import FINAL_SETTINGS, VISIBLE, StoreCore, ms
from mailmeta.store._rows import SELECT_COLUMNS, row_to_message
from mailmeta.store._tables import TABLE

_COLS = ", ".join(SELECT_COLUMNS)
_T = "fromUnixTimestamp64Milli({cur_at:Int64}, 'UTC')"
_WINDOW = " AND received_at >= fromUnixTimestamp64Milli({win_from:Int64}, 'UTC')"
# How far search_events looks back, step by step, before it looks at everything.
_HOUR_MS = 3_600_000
_WINDOWS_MS = (_HOUR_MS, 12 * _HOUR_MS, 7 * 24 * _HOUR_MS)


@dataclass(frozen=True, slots=True)
class SearchFilter:
    """Each tuple holds every stored form a value may have (clear, HMAC'd): any matches."""

    since: datetime | None = None
    until: datetime | None = None
    statuses: Sequence[str] = ()
    senders: Sequence[str] = ()
    recipients: Sequence[str] = ()
    message_ids: Sequence[str] = ()
    subject: str | None = None  # case-insensitive substring


@dataclass(frozen=True, slots=True)
class Cursor:
    received_ms: int
    event_id: str


@runtime_checkable
class SearchStore(Protocol):
    def search_events(
        self, customer: str, flt: SearchFilter, limit: int, after: Cursor | None = None
    ) -> tuple[list[dict[str, Any]], Cursor | None]: ...

    def get_event(self, customer: str, event_id: str) -> dict[str, Any] | None: ...

    def message_history(self, customer: str, message_id: str) -> list[dict[str, Any]]: ...


_NO_FILTER = SearchFilter()


class SearchMixin(StoreCore):
    # Per (customer, unfiltered?): the window step the last page was found in. Only a
    # starting guess: every step is exact, so a stale hint costs time, never correctness.
    _window_hint: dict[tuple[str, bool], int]

    def _where(self, customer: str, flt: SearchFilter, params: dict[str, Any]) -> str:
        params.update(c=customer, days=self._days(customer))
        where = f"customer_id = {{c:String}} AND {VISIBLE}"
        if flt.since is not None:
            where += " AND received_at >= fromUnixTimestamp64Milli({since:Int64}, 'UTC')"
            params["since"] = ms(flt.since)
        if flt.until is not None:
            where += " AND received_at < fromUnixTimestamp64Milli({until:Int64}, 'UTC')"
            params["until"] = ms(flt.until)
        if flt.statuses:
            where += " AND status IN {st:Array(String)}"
            params["st"] = list(flt.statuses)
        if flt.senders:
            where += " AND mail_from IN {snd:Array(String)}"
            params["snd"] = list(flt.senders)
        if flt.recipients:
            where += " AND hasAny(rcpt_to, {rcp:Array(String)})"
            params["rcp"] = list(flt.recipients)
        if flt.message_ids:
            where += " AND message_id IN {mid:Array(String)}"
            params["mid"] = list(flt.message_ids)
        if flt.subject:
            where += " AND positionCaseInsensitiveUTF8(ifNull(subject, ''), {subj:String}) > 0"
            params["subj"] = flt.subject
        return where

    def search_events(
        self, customer: str, flt: SearchFilter, limit: int, after: Cursor | None = None
    ) -> tuple[list[dict[str, Any]], Cursor | None]:
        """One page of matching events, newest first, and the cursor of the next (or None)."""
        params: dict[str, Any] = {"limit": limit + 1}
        where = self._where(customer, flt, params)
        if after is not None:
            # Spelled out (not a tuple comparison) so the primary key prunes on received_at.
            where += f" AND received_at <= {_T} AND (received_at < {_T} OR event_id < toUUID({{cur_id:String}}))"
            params.update(cur_at=after.received_ms, cur_id=after.event_id)
        sql = (
            f"SELECT {_COLS}, toUnixTimestamp64Milli(received_at) FROM {TABLE} FINAL WHERE {where}"
        )
        order = " ORDER BY received_at DESC, event_id DESC LIMIT {limit:UInt32}" + FINAL_SETTINGS
        # FINAL over all of a customer's rows is what makes a page slow on a big table, so
        # look back from the cursor (or now) through growing windows. Everything inside a
        # window is newer than everything outside it: a window holding limit+1 matches holds
        # exactly the newest limit+1, so the page is exact; the last step has no bound.
        anchor = after.received_ms if after is not None else int(time.time() * 1000)
        key = (customer, flt == _NO_FILTER)
        step = self._window_hint.get(key, 0)
        while True:
            window = _WINDOWS_MS[step] if step < len(_WINDOWS_MS) else None
            if window is None:
                rows = self._rows(sql + order, params)
                break
            params["win_from"] = anchor - window
            rows = self._rows(sql + _WINDOW + order, params)
            if len(rows) > limit:
                break
            step += 1
        if len(rows) > limit:
            # The next page starts at the smallest window that would have held this one.
            reach = anchor - int(rows[-1][-1])
            step = next((i for i, w in enumerate(_WINDOWS_MS) if reach < w), len(_WINDOWS_MS))
        self._window_hint[key] = step
        page = rows[:limit]
        out = [row_to_message(r[:-1]) for r in page]
        nxt = Cursor(int(page[-1][-1]), str(page[-1][0])) if len(rows) > limit else None
        return out, nxt

    def get_event(self, customer: str, event_id: str) -> dict[str, Any] | None:
        params: dict[str, Any] = {"eid": event_id}
        where = self._where(customer, SearchFilter(), params)
        rows = self._rows(
            f"SELECT {_COLS} FROM {TABLE} FINAL WHERE {where} AND event_id = toUUID({{eid:String}}) "
            "LIMIT 1" + FINAL_SETTINGS,
            params,
        )
        return row_to_message(rows[0]) if rows else None

    def message_history(self, customer: str, message_id: str) -> list[dict[str, Any]]:
        """Every visible event of one message (same customer and message id), oldest first."""
        params: dict[str, Any] = {}
        where = self._where(customer, SearchFilter(message_ids=(message_id,)), params)
        rows = self._rows(
            f"SELECT {_COLS} FROM {TABLE} FINAL WHERE {where} "
            "ORDER BY received_at, event_id LIMIT 1000" + FINAL_SETTINGS,
            params,
        )
        return [row_to_message(r) for r in rows]
