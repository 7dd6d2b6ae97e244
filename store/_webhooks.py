"""Webhook endpoints and their durable delivery queue in ClickHouse (a ClickHouseStore mixin).

Both tables are ReplacingMergeTrees read with FINAL: a change is a newer row. The outbox holds
one row per (endpoint, event, replay) in its newest state; ``ver`` ranks states so a settled
row (delivered or failed) is never turned pending again by a re-read event.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import orjson
import pyarrow as pa

from mailmeta.schema import decode_event, format_time, to_utc
from mailmeta.store._core import StoreCore
from mailmeta.store._rows import to_arrow
from mailmeta.store._tables import WEBHOOK_ENDPOINTS_TABLE, WEBHOOK_OUTBOX_TABLE

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SETTLED = 1 << 32  # ver of a settled row: above any pending row's attempt count
_EP_COLUMNS = (
    "endpoint_id",
    "customer_id",
    "url",
    "statuses",
    "active",
    "secret",
    "previous_secret",
    "previous_until",
    "created_at",
    "deleted",
    "updated_at",
)
_OB_COLUMNS = (
    "endpoint_id",
    "event_id",
    "replay_id",
    "customer_id",
    "chunk",
    "seq",
    "created_at",
    "payload",
    "state",
    "attempts",
    "last_status",
    "last_error",
    "webhook_id",
    "settled_at",
    "keep_days",
    "ver",
)
OUTBOX_KEEP_DAYS = 8  # at most what the redacted topic keeps (and the failure log)
State = Literal["pending", "delivered", "failed"]


def webhook_payload(event: dict[str, Any]) -> str:
    """An event as the outbox keeps it and a webhook carries it: the fields the policy
    stored, a dropped (None) one absent."""
    return orjson.dumps({k: v for k, v in event.items() if v is not None}).decode()


@dataclass(slots=True)
class WebhookEndpoint:
    endpoint_id: str
    customer_id: str
    url: str
    statuses: frozenset[str]  # empty: every status
    active: bool
    secret: str = field(repr=False)
    created_at: datetime
    previous_secret: str = field(default="", repr=False)
    previous_until: datetime = _EPOCH
    deleted: bool = False

    def wants(self, status: str) -> bool:
        return self.active and not self.deleted and (not self.statuses or status in self.statuses)

    def secrets(self, now: datetime) -> list[str]:
        """The secrets to sign with now: the current one, and the previous one while its
        rotation overlap lasts (Standard Webhooks: space-separated signatures)."""
        if self.previous_secret and now < self.previous_until:
            return [self.secret, self.previous_secret]
        return [self.secret]

    def public(self) -> dict[str, Any]:
        """What the API shows: never a secret."""
        return {
            "id": self.endpoint_id,
            "customer": self.customer_id,
            "url": self.url,
            "statuses": sorted(self.statuses),
            "active": self.active,
            "created_at": format_time(self.created_at),
            "previous_secret_until": (
                format_time(self.previous_until) if self.previous_secret else None
            ),
        }


@dataclass(frozen=True, slots=True)
class OutboxRow:
    endpoint_id: str
    event_id: str
    customer_id: str
    payload: str  # the event as JSON, as the redacted topic carried it
    chunk: int  # rows enqueued together share it: a delivery batch never spans chunks
    seq: int
    created_at: datetime
    replay_id: str = ""  # "" for live events
    state: State = "pending"
    attempts: int = 0
    last_status: int = 0
    last_error: str = ""
    webhook_id: str = ""
    settled_at: datetime | None = None
    keep_days: int = OUTBOX_KEEP_DAYS


@runtime_checkable
class WebhookStore(Protocol):
    def save_webhook_endpoint(self, endpoint: WebhookEndpoint) -> None: ...

    def webhook_endpoints(self, customer: str | None = None) -> list[WebhookEndpoint]: ...

    def webhook_endpoint(self, endpoint_id: str) -> WebhookEndpoint | None: ...

    def enqueue_webhooks(self, rows: Sequence[OutboxRow]) -> int: ...
    def pending_webhooks(self, endpoint_id: str, limit: int) -> list[OutboxRow]: ...

    def webhook_backlog(self) -> dict[str, tuple[int, datetime]]: ...

    def settle_webhooks(
        self,
        rows: Sequence[OutboxRow],
        state: State,
        *,
        attempts: int,
        last_status: int,
        last_error: str,
        webhook_id: str,
    ) -> None: ...

    def webhook_deliveries(
        self, endpoint_id: str, state: State | None = None, limit: int = 100
    ) -> list[dict[str, Any]]: ...


class WebhooksMixin(StoreCore):
    """Needs the host's ``_rows`` / ``_client`` / ``_retention`` (ClickHouseStore)."""

    if TYPE_CHECKING:

        def _client(self) -> AbstractContextManager[Any]: ...

        def _without_erased(self, table: pa.Table) -> pa.Table: ...

        def _erasures(self) -> dict[str, Any]: ...

    # --- endpoints ---------------------------------------------------------------------------

    def save_webhook_endpoint(self, endpoint: WebhookEndpoint) -> None:
        e = endpoint
        row = [
            e.endpoint_id,
            e.customer_id,
            e.url,
            sorted(e.statuses),
            int(e.active),
            e.secret,
            e.previous_secret,
            e.previous_until,
            e.created_at,
            int(e.deleted),
            datetime.now(UTC),
        ]
        with self._client() as c:
            c.insert(
                WEBHOOK_ENDPOINTS_TABLE,
                [row],
                column_names=list(_EP_COLUMNS),
                settings=self._insert_settings(),
            )

    def webhook_endpoints(self, customer: str | None = None) -> list[WebhookEndpoint]:
        where, params = "NOT deleted", {}
        if customer is not None:
            where += " AND customer_id = {c:String}"
            params["c"] = customer
        rows = self._rows(
            f"SELECT {', '.join(_EP_COLUMNS)} FROM {WEBHOOK_ENDPOINTS_TABLE} FINAL "
            f"WHERE {where} ORDER BY created_at, endpoint_id",
            params,
        )
        return [_endpoint(r) for r in rows]

    def webhook_endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        rows = self._rows(
            f"SELECT {', '.join(_EP_COLUMNS)} FROM {WEBHOOK_ENDPOINTS_TABLE} FINAL "
            "WHERE endpoint_id = {e:String} AND NOT deleted",
            {"e": endpoint_id},
        )
        return _endpoint(rows[0]) if rows else None

    # --- the outbox --------------------------------------------------------------------------

    def enqueue_webhooks(self, rows: Sequence[OutboxRow]) -> int:
        """Add the rows not already queued (in any state): an event read again after a
        crash keeps its place, its batch and its settled state. An event the erasure log
        names (a topic re-read after an erasure) is not queued. Returns how many were new."""
        if not rows:
            return 0
        # Under the write lock: an erasure cannot fall between the checks and the insert.
        with self._write_lock:
            known = self._queued(rows)
            new = [r for r in rows if (r.endpoint_id, r.event_id, r.replay_id) not in known]
            new = self._not_erased(new)
            if new:
                self._insert_outbox(new)
        return len(new)

    def _queued(self, rows: Sequence[OutboxRow]) -> set[tuple[str, str, str]]:
        return {
            (ep, str(ev), rp)
            for ep, ev, rp in self._rows(
                f"SELECT endpoint_id, event_id, replay_id FROM {WEBHOOK_OUTBOX_TABLE} "
                "WHERE endpoint_id IN {eps:Array(String)} AND event_id IN {evs:Array(UUID)}",
                {
                    "eps": sorted({r.endpoint_id for r in rows}),
                    "evs": sorted({r.event_id for r in rows}),
                },
            )
        }

    def _not_erased(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        erased = self._erasures()
        if not any(r.customer_id in erased for r in rows):
            return rows
        events = [decode_event(r.payload.encode()) for r in rows]
        table = to_arrow(
            events, {e.customer_id: r.keep_days for e, r in zip(events, rows, strict=True)}
        )
        kept = {
            str(uuid.UUID(bytes=b))
            for b in self._without_erased(table).column("event_id").to_pylist()
        }
        return [r for r in rows if r.event_id in kept]

    def pending_webhooks(self, endpoint_id: str, limit: int) -> list[OutboxRow]:
        """The endpoint's next batch: the oldest pending rows of one chunk and one replay."""
        rows = self._rows(
            f"SELECT {', '.join(_OB_COLUMNS)} FROM {WEBHOOK_OUTBOX_TABLE} FINAL "
            "WHERE endpoint_id = {e:String} AND state = 'pending' "
            "ORDER BY chunk, seq LIMIT {n:UInt32}",
            {"e": endpoint_id, "n": limit},
        )
        out = [_outbox(r) for r in rows]
        if out:
            head = out[0]
            out = [r for r in out if r.chunk == head.chunk and r.replay_id == head.replay_id]
        return out

    def webhook_backlog(self) -> dict[str, tuple[int, datetime]]:
        """Pending rows per endpoint: how many, and when the oldest was queued."""
        rows = self._rows(
            f"SELECT endpoint_id, count(), min(created_at) FROM {WEBHOOK_OUTBOX_TABLE} FINAL "
            "WHERE state = 'pending' GROUP BY endpoint_id"
        )
        return {ep: (int(n), to_utc(oldest) or _EPOCH) for ep, n, oldest in rows}

    def settle_webhooks(
        self,
        rows: Sequence[OutboxRow],
        state: State,
        *,
        attempts: int,
        last_status: int,
        last_error: str,
        webhook_id: str,
    ) -> None:
        now = datetime.now(UTC)
        # Only rows still queued: a new version of a row an erasure deleted meanwhile would
        # bring its payload back. The write lock orders this against erasures.
        with self._write_lock:
            known = self._queued(rows)
            rows = [r for r in rows if (r.endpoint_id, r.event_id, r.replay_id) in known]
            if not rows:
                return
            self._insert_outbox(
                [
                    replace(
                        r,
                        state=state,
                        attempts=attempts,
                        last_status=last_status,
                        last_error=last_error[:500],
                        webhook_id=webhook_id,
                        settled_at=now if state != "pending" else None,
                    )
                    for r in rows
                ]
            )

    def webhook_deliveries(
        self, endpoint_id: str, state: State | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The endpoint's queue and log, newest first: never the payload."""
        params: dict[str, Any] = {"e": endpoint_id, "n": limit}
        where = "endpoint_id = {e:String}"
        if state is not None:
            where += " AND state = {s:String}"
            params["s"] = state
        rows = self._rows(
            f"SELECT event_id, replay_id, state, attempts, last_status, last_error, webhook_id,"
            f" created_at, settled_at FROM {WEBHOOK_OUTBOX_TABLE} FINAL WHERE {where} "
            "ORDER BY chunk DESC, seq DESC LIMIT {n:UInt32}",
            params,
        )
        return [
            {
                "event_id": str(ev),
                "replay": bool(rp),
                "state": st,
                "attempts": int(at),
                "last_status": int(ls) or None,
                "last_error": le or None,
                "webhook_id": wid or None,
                "queued_at": format_time(to_utc(ca) or _EPOCH),
                "settled_at": format_time(sa) if (sa := to_utc(sat)) else None,
            }
            for ev, rp, st, at, ls, le, wid, ca, sat in rows
        ]

    def _insert_outbox(self, rows: Sequence[OutboxRow]) -> None:
        data = [
            [
                r.endpoint_id,
                r.event_id,
                r.replay_id,
                r.customer_id,
                r.chunk,
                r.seq,
                r.created_at,
                r.payload,
                r.state,
                r.attempts,
                r.last_status,
                r.last_error,
                r.webhook_id,
                r.settled_at,
                min(r.keep_days, self._retention.get(r.customer_id, r.keep_days)),
                r.attempts if r.state == "pending" else _SETTLED | r.attempts,
            ]
            for r in rows
        ]
        with self._client() as c:
            c.insert(
                WEBHOOK_OUTBOX_TABLE,
                data,
                column_names=list(_OB_COLUMNS),
                settings=self._insert_settings(),
            )


def _endpoint(r: Sequence[Any]) -> WebhookEndpoint:
    ep, cust, url, statuses, active, secret, prev, prev_until, created, deleted, _ = r
    return WebhookEndpoint(
        endpoint_id=ep,
        customer_id=cust,
        url=url,
        statuses=frozenset(statuses),
        active=bool(active),
        secret=secret,
        created_at=to_utc(created) or _EPOCH,
        previous_secret=prev,
        previous_until=to_utc(prev_until) or _EPOCH,
        deleted=bool(deleted),
    )


def _outbox(r: Sequence[Any]) -> OutboxRow:
    ep, ev, rp, cust, chunk, seq, created, payload, state, att, ls, le, wid, sat, keep, _ = r
    return OutboxRow(
        endpoint_id=ep,
        event_id=str(ev),
        customer_id=cust,
        payload=payload,
        chunk=int(chunk),
        seq=int(seq),
        created_at=to_utc(created) or _EPOCH,
        replay_id=rp,
        state=state,
        attempts=int(att),
        last_status=int(ls),
        last_error=le,
        webhook_id=wid,
        settled_at=to_utc(sat),
        keep_days=int(keep),
    )
