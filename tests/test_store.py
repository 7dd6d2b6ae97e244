"""ClickHouseStore on the real engine (embedded chdb, a fresh directory per test)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import pytest

from mailmeta.config import Customer, Customers
from mailmeta.schema import Event
from mailmeta.store import MIGRATIONS, ClickHouseStore, SearchFilter, UnstorableEvent
from tests.event_helpers import Redacted, raw_event

# A realistic policy: senders hashed with the customer's key, recipients masked, the client
# network kept, the rest as it came.
POLICY: dict[str, Any] = {
    "sender_ip": "truncate_ip",
    "helo": "keep",
    "mail_from": "hmac",
    "rcpt_to": "mask",
    "message_id": "keep",
    "subject": "keep",
    "date": "keep",
    "size_bytes": "keep",
    "smtp_reply": "keep",
    "processing_ms": "keep",
    "tls_version": "keep",
}
CUSTOMERS = Customers(
    [
        Customer(
            id="acme",
            domains=["acme.example"],
            retention_days=60,
            hmac_key="acme-store-test-hmac-key-0123456789",
            policy=POLICY,
            policy_version=3,
        ),
        # beta stores senders clear: the same stored value as an acme row's can occur.
        Customer(
            id="beta",
            domains=["beta.example"],
            retention_days=30,
            policy={**POLICY, "mail_from": "keep"},
        ),
        Customer(
            id="long",
            domains=["long.example"],
            retention_days=90,
            hmac_key="long-store-test-hmac-key-0123456789",
            policy=POLICY,
        ),
    ]
)
RETENTION = {c.id: c.retention_days for c in CUSTOMERS}
# Stored rows: raw events through the real redactor.
event = Redacted(CUSTOMERS, default="acme")


@pytest.fixture
def dsn(tmp_path: Path) -> str:
    return f"chdb://{tmp_path / 'ch'}"


@pytest.fixture
def store(dsn: str) -> Iterator[ClickHouseStore]:
    s = ClickHouseStore(dsn, RETENTION)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def raw(store: ClickHouseStore, dsn: str) -> Iterator[clickhouse_connect.driver.client.Client]:
    """A second client on the same engine, to look at the table directly."""
    client = clickhouse_connect.get_client(dsn=dsn)
    try:
        yield client
    finally:
        client.close()


def physical_rows(raw: clickhouse_connect.driver.client.Client) -> int:
    return int(raw.query("SELECT count() FROM messages").result_rows[0][0])


def test_migrations_are_versioned_and_idempotent(
    store: ClickHouseStore, raw: clickhouse_connect.driver.client.Client, dsn: str
) -> None:
    latest = max(m.version for m in MIGRATIONS)
    assert store.schema_version() == latest
    assert store.migrate() == []  # second run: nothing to do
    second = ClickHouseStore(dsn, RETENTION)  # another start on the same data: a no-op too
    try:
        assert second.migrate() == []
    finally:
        second.close()
    rows = raw.query("SELECT version FROM schema_migrations ORDER BY version").result_rows
    assert [r[0] for r in rows] == sorted(m.version for m in MIGRATIONS)
    ddl = str(raw.command("SHOW CREATE TABLE messages"))
    assert "TTL received_at + toIntervalDay(retention_days)" in ddl
    assert "merge_with_ttl_timeout = 3600" in ddl
    assert "ReplacingMergeTree" in ddl


def test_round_trip_every_field_newest_first(store: ClickHouseStore) -> None:
    older = event(
        age=timedelta(minutes=5),
        subject="Invoice — März ✓",
        rcpt_to=["jane@acme.example", "kim@acme.example"],
    )
    newest = event(rcpt_to=None, helo=None, size_bytes=0)
    middle = event(age=timedelta(minutes=1), rcpt_to=[], processing_ms=None, date=None)
    # What the redactor made of the clear values is what goes in and comes back.
    assert older.mail_from == event.hashed("acme", "alice@sender.example")
    assert older.rcpt_to == ["j***@acme.example", "k***@acme.example"]
    assert (older.sender_ip, older.policy_version) == ("198.51.100.0/24", 3)
    assert store.insert_events([older, newest, middle]) == 3

    got = store.query_messages("acme")
    assert [m["event_id"] for m in got] == [newest.event_id, middle.event_id, older.event_id]
    assert got[0] == newest.to_dict()
    assert got[2] == older.to_dict()
    # An empty recipient list and a dropped one are stored alike and come back as null.
    assert got[1] == {**middle.to_dict(), "rcpt_to": None}


def test_filters_limit_and_customer_isolation(store: ClickHouseStore) -> None:
    acme = [event(age=timedelta(seconds=i)) for i in range(5)]
    beta = event("beta", message_id=acme[0].message_id)
    store.insert_events([*acme, beta])

    assert [m["event_id"] for m in store.query_messages("acme", limit=2)] == [
        acme[0].event_id,
        acme[1].event_id,
    ]
    only = store.query_messages("acme", message_id=acme[3].message_id)
    assert [m["event_id"] for m in only] == [acme[3].event_id]
    assert [m["event_id"] for m in store.query_messages("beta")] == [beta.event_id]
    # Values are bound parameters: SQL in them is just text that matches nothing.
    assert store.query_messages("acme", message_id="x' OR 1=1 --") == []
    assert store.query_messages("acme' OR '1'='1") == []
    with pytest.raises(ValueError):
        store.query_messages("acme", limit=0)


def test_redelivered_event_is_one_row(
    store: ClickHouseStore, raw: clickhouse_connect.driver.client.Client
) -> None:
    ev = event()
    store.insert_events([ev])
    store.insert_events([ev])  # at-least-once: the same event again, in another insert
    assert len(store.query_messages("acme")) == 1
    assert store.count("acme", visible_only=True) == 1
    store.force_ttl_merge()
    assert physical_rows(raw) == 1


def test_newest_policy_version_wins(store: ClickHouseStore) -> None:
    raw = raw_event("acme", subject="kept by v3")
    older = event.of(raw)
    stricter = event.changed("acme", {**POLICY, "subject": "drop"}, 4).of(raw)
    assert (older.policy_version, older.subject) == (3, "kept by v3")
    store.insert_events([stricter])
    store.insert_events([older])  # a late redelivery of the copy redacted by the old policy
    [got] = store.query_messages("acme")
    assert got["policy_version"] == 4
    assert got["subject"] is None


def test_expired_rows_never_returned_and_removed_by_ttl_merge(
    store: ClickHouseStore, raw: clickhouse_connect.driver.client.Client
) -> None:
    # Background TTL merges would remove the row at an unknown moment; hold them so the
    # test sees the state every query must handle: expired but still on disk.
    raw.command("SYSTEM STOP TTL MERGES messages")
    live = event(age=timedelta(days=59))
    expired = event(age=timedelta(days=61))  # acme keeps 60 days
    store.insert_events([live, expired])

    assert physical_rows(raw) == 2
    assert [m["event_id"] for m in store.query_messages("acme")] == [live.event_id]
    assert store.query_messages("acme", message_id=expired.message_id) == []
    assert store.count("acme", visible_only=True) == 1

    raw.command("SYSTEM START TTL MERGES messages")
    store.force_ttl_merge()
    assert physical_rows(raw) == 1
    assert [m["event_id"] for m in store.query_messages("acme")] == [live.event_id]


def test_shortened_retention_applies_at_once(dsn: str) -> None:
    ev = event(age=timedelta(days=45))
    with ClickHouseStore(dsn, {"acme": 90}) as before:
        before.insert_events([ev])
        assert len(before.query_messages("acme")) == 1
    # The customer's promise drops to 30 days: the row (stored with 90) is hidden now.
    with ClickHouseStore(dsn, {"acme": 30}) as after:
        assert after.query_messages("acme") == []
        assert after.count("acme") == 1


def _unstorable(fields: dict[str, Any]) -> Event:
    """A stored row's raw input carrying ``fields``; what no redactor writes (an unknown
    customer, a version out of range) is set on the redactor's output instead."""
    if "customer_id" in fields or fields.get("policy_version") is not None:
        return replace(event(), **fields)
    if "policy_version" in fields:  # never went through redaction
        return raw_event("acme")
    return event(**fields)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"customer_id": "nobody"}, "customer_id"),
        ({"event_id": "not-a-uuid"}, "event_id"),
        ({"policy_version": None}, "not redacted"),
        ({"policy_version": 1 << 33}, "policy_version"),
        ({"size_bytes": -1}, "size_bytes"),
        ({"received_at": "1850-01-01T00:00:00Z"}, "received_at"),
        ({"subject": "\ud800"}, "subject"),
        # Masking keeps the first character: a lone surrogate there survives redaction.
        ({"rcpt_to": ["ok@acme.example", "\udfff@acme.example"]}, "rcpt_to"),
    ],
)
def test_unstorable_events_are_named_and_never_half_inserted(
    store: ClickHouseStore, fields: dict[str, object], reason: str
) -> None:
    bad = _unstorable(fields)
    why = store.check_event(bad)
    assert why is not None and reason in why
    for value in fields.values():  # the reason goes to logs: it must not carry the value
        if isinstance(value, str) and len(value) > 3:
            assert value not in why
    good = event()
    assert store.check_event(good) is None
    with pytest.raises(UnstorableEvent):
        store.insert_events([good, bad])
    assert store.count() == 0


def test_date_header_parsed_into_a_time_column(
    store: ClickHouseStore, raw: clickhouse_connect.driver.client.Client
) -> None:
    header = "Tue, 1 Jul 2003 10:52:37 +0200"
    rfc = event(date=header)
    hashed = event.changed("acme", {**POLICY, "date": "hmac"}, 4)(date=header)
    assert hashed.date == event.hashed("acme", header)
    store.insert_events([rfc, hashed])
    rows = dict(
        raw.query(
            "SELECT date_text, date FROM messages WHERE event_id IN {ids:Array(UUID)}",
            parameters={"ids": [rfc.event_id, hashed.event_id]},
        ).result_rows
    )
    assert rows[rfc.date] == datetime(2003, 7, 1, 8, 52, 37)
    assert rows[hashed.date] is None
    # The API returns the header exactly as the event carried it.
    dates = {m["event_id"]: m["date"] for m in store.query_messages("acme")}
    assert dates == {rfc.event_id: rfc.date, hashed.event_id: hashed.date}


def test_reopen_keeps_rows_and_one_process_can_switch_paths(tmp_path: Path) -> None:
    first, other = f"chdb://{tmp_path / 'a'}", f"chdb://{tmp_path / 'b'}"
    ev = event()
    with ClickHouseStore(first, RETENTION) as s:
        s.insert_events([ev])
    # One chdb path at a time per process, but a closed one can be followed by another.
    with ClickHouseStore(other, RETENTION) as s:
        assert s.count() == 0
    with ClickHouseStore(first, RETENTION) as s:
        assert [m["event_id"] for m in s.query_messages("acme")] == [ev.event_id]


def test_concurrent_inserts_and_queries(store: ClickHouseStore) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                store.query_messages("acme", limit=10)
                store.ping()
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for _ in range(10):
            store.insert_events([event() for _ in range(200)])
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    assert not errors
    assert store.count("acme", visible_only=True) == 2000


def test_audit_log_is_append_only_and_newest_first(tmp_path: Path) -> None:
    with ClickHouseStore(f"chdb://{tmp_path / 'ch'}", {"demo": 60}) as store:
        store.append_audit("op@example", "policy.set", "demo", {"from": 1, "to": 2})
        store.append_audit("op@example", "erase", "demo", {"rows": 3})
        store.append_audit("op@example", "erase", "other", {"rows": 1})
        demo = store.read_audit("demo")
        assert [r["action"] for r in demo] == ["erase", "policy.set"]
        assert demo[1]["details"] == {"from": 1, "to": 2}
        assert demo[0]["actor"] == "op@example" and demo[0]["at"].endswith("Z")
        assert len(store.read_audit()) == 3


def _all_pages(
    store: ClickHouseStore, flt: SearchFilter, limit: int, customer: str = "acme"
) -> list[str]:
    got: list[str] = []
    after = None
    for _ in range(100):
        page, after = store.search_events(customer, flt, limit, after)
        got += [m["event_id"] for m in page]
        if after is None:
            return got
    raise AssertionError("paging did not end")


def test_search_pages_are_exact_across_look_back_windows(store: ClickHouseStore) -> None:
    # Ages on both sides of each look-back window (1 h, 12 h, 7 d) and past the last one, and
    # a bounced minority that only the widest steps find: every page must be the exact
    # newest-first slice, whatever window the previous page left as the hint.
    ages = [timedelta(minutes=m) for m in (1, 2, 30, 59, 61, 90)]
    ages += [timedelta(hours=h) for h in (11, 13, 30, 160, 170)]
    ages += [timedelta(days=d) for d in (8, 20, 40)]
    events = [
        event(age=age, status="bounced" if i % 4 == 0 else "delivered")
        for i, age in enumerate(ages)
    ]
    store.insert_events(events)
    newest_first = [e.event_id for e in sorted(events, key=lambda e: e.received_at, reverse=True)]
    bounced = [
        e.event_id
        for e in sorted(events, key=lambda e: e.received_at, reverse=True)
        if e.status == "bounced"
    ]
    for limit in (1, 2, 3, 5, 50):
        assert _all_pages(store, SearchFilter(), limit) == newest_first, limit
        assert _all_pages(store, SearchFilter(statuses=("bounced",)), limit) == bounced, limit
    # A busier customer later: the hint left by sparse pages must not hide the new rows.
    fresh = [event(age=timedelta(seconds=s)) for s in range(1, 8)]
    store.insert_events(fresh)
    first, _ = store.search_events("acme", SearchFilter(), 3)
    assert [m["event_id"] for m in first] == [e.event_id for e in fresh[:3]]
    assert [m["event_id"] for m in store.query_messages("acme", limit=4)] == [
        e.event_id for e in fresh[:4]
    ]
