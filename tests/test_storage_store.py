"""Retention, erasure, status history, hourly aggregates and export pages on the real engine."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client

from mailmeta.schema import Event, encode_event, format_time
from mailmeta.store import MIGRATIONS, ClickHouseStore, migrate
from tests.test_store import CUSTOMERS, POLICY, event

RETENTION = {c.id: c.retention_days for c in CUSTOMERS}


@pytest.fixture
def dsn(tmp_path: Path) -> str:
    return f"chdb://{tmp_path / 'ch'}"


@pytest.fixture
def store(dsn: str) -> Iterator[ClickHouseStore]:
    with ClickHouseStore(dsn, RETENTION) as s:
        yield s


@pytest.fixture
def raw(store: ClickHouseStore, dsn: str) -> Iterator[Client]:
    client = clickhouse_connect.get_client(dsn=dsn)
    try:
        yield client
    finally:
        client.close()


def stored(raw: Client, customer: str) -> dict[str, int]:
    """event_id -> retention_days of every physical row of ``customer``."""
    rows = raw.query(
        "SELECT toString(event_id), retention_days FROM messages WHERE customer_id = {c:String}",
        parameters={"c": customer},
    ).result_rows
    return {eid: days for eid, days in rows}


def test_retention_per_customer_60_vs_90(store: ClickHouseStore, raw: Client) -> None:
    raw.command("SYSTEM STOP TTL MERGES messages")
    try:
        acme = event("acme", age=timedelta(days=75))
        long = event("long", age=timedelta(days=75))
        store.insert_events([acme, long])
        assert stored(raw, "acme") == {acme.event_id: 60}
        assert stored(raw, "long") == {long.event_id: 90}
        # 75 days old: past acme's 60, within long's 90.
        assert store.query_messages("acme") == []
        assert [m["event_id"] for m in store.query_messages("long")] == [long.event_id]
    finally:
        raw.command("SYSTEM START TTL MERGES messages")
    store.force_ttl_merge()
    assert stored(raw, "acme") == {}
    assert stored(raw, "long") == {long.event_id: 90}


def test_shortening_retention_rewrites_and_removes_stored_rows(
    store: ClickHouseStore, raw: Client, dsn: str
) -> None:
    young, old = event(age=timedelta(days=10)), event(age=timedelta(days=40))
    other = event("long", age=timedelta(days=40))
    store.insert_events([young, old, other])

    change = store.set_retention("acme", 30)
    assert (change.previous_days, change.days) == (60, 30)
    assert (change.rows_expired, change.rows_updated) == (1, 1)
    # Physically: the 40-day row is gone, the other carries the new retention (its TTL).
    assert stored(raw, "acme") == {young.event_id: 30}
    assert stored(raw, "long") == {other.event_id: 90}  # other customers untouched
    # Future rows get it too, and it outlives this store (the sink's restart).
    new = event()
    store.insert_events([new])
    assert stored(raw, "acme")[new.event_id] == 30
    assert store.retention()["acme"] == 30
    with ClickHouseStore(dsn, RETENTION) as again:
        assert again.retention() == {**RETENTION, "acme": 30}

    longer = store.set_retention("acme", 120)
    assert (longer.previous_days, longer.rows_updated, longer.rows_expired) == (30, 2, 0)
    assert set(stored(raw, "acme").values()) == {120}
    audit_free = store.read_audit("acme")  # the store does not audit; the API does
    assert audit_free == []
    with pytest.raises(ValueError):
        store.set_retention("acme", 0)
    with pytest.raises(KeyError):
        store.set_retention("nobody", 5)


def test_another_process_store_learns_a_retention_change(store: ClickHouseStore, dsn: str) -> None:
    # In server mode several sinks share the tables; each re-reads the overrides.
    with ClickHouseStore(dsn, RETENTION) as other:
        store.set_retention("beta", 7)
        assert other.retention()["beta"] == 30
        other.load_retention_overrides()
        assert other.retention()["beta"] == 7


def test_erase_by_value_and_everything(store: ClickHouseStore, raw: Client) -> None:
    # Senders hashed, recipients kept clear: an address is erased in either form.
    rows = event.changed("acme", {**POLICY, "rcpt_to": "keep"}, 4)
    hit_from = rows(mail_from="frank@x.example", rcpt_to=["x@y.example"])
    hit_rcpt = rows(mail_from="other@x.example", rcpt_to=["a@b.example", "alice@x.example"])
    hit_mid = rows(message_id="<m1@x>")
    keep = rows(mail_from="frank@x.example.org", rcpt_to=["alice@x.example.org"])
    beta = event("beta", mail_from="frank@x.example")  # beta keeps senders clear
    assert hit_from.mail_from == event.hashed("acme", "frank@x.example")
    store.insert_events([hit_from, hit_rcpt, hit_mid, keep, beta])
    store.insert_events([hit_from])  # a duplicate copy not merged yet: erased as well

    # What the API's erase passes: every stored form of the clear addresses.
    forms = event.forms("acme", "frank@x.example", "alice@x.example")
    assert beta.mail_from in forms
    erased = store.erase("acme", addresses=forms)
    assert erased.rows == 3
    assert set(stored(raw, "acme")) == {hit_mid.event_id, keep.event_id}
    assert store.erase("acme", message_ids=["<m1@x>"]).rows == 1
    assert set(stored(raw, "acme")) == {keep.event_id}
    assert set(stored(raw, "beta")) == {beta.event_id}  # same stored value, other customer

    hourly = "SELECT count() FROM hourly_events WHERE customer_id = {c:String}"
    assert raw.query(hourly, parameters={"c": "acme"}).result_rows[0][0] > 0
    everything = store.erase("acme", everything=True)
    assert everything.rows == 1 and everything.aggregate_rows > 0
    assert stored(raw, "acme") == {}
    assert raw.query(hourly, parameters={"c": "acme"}).result_rows[0][0] == 0
    assert raw.query(hourly, parameters={"c": "beta"}).result_rows[0][0] == 1
    with pytest.raises(ValueError):
        store.erase("acme")
    with pytest.raises(ValueError):
        store.erase("acme", addresses=["a"], everything=True)


def test_hourly_stats_count_by_hour_and_status(store: ClickHouseStore) -> None:
    now = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
    events = [
        event(
            received_at=format_time(now - timedelta(hours=2)), status="delivered", size_bytes=100
        ),
        event(received_at=format_time(now - timedelta(hours=2)), status="delivered", size_bytes=50),
        event(received_at=format_time(now - timedelta(hours=2)), status="bounced", size_bytes=None),
        event(received_at=format_time(now - timedelta(hours=1)), status="delivered", size_bytes=7),
        event("beta", received_at=format_time(now - timedelta(hours=1)), size_bytes=1),
    ]
    for e in events:  # one insert each: the aggregate sums across inserts
        store.insert_events([e])
    hours = store.hourly_stats("acme", now - timedelta(hours=3), now + timedelta(hours=1))
    h2 = format_time((now - timedelta(hours=2)).replace(minute=0))
    h1 = format_time((now - timedelta(hours=1)).replace(minute=0))
    assert hours == [
        {"hour": h2, "status": "bounced", "messages": 1, "bytes": 0},
        {"hour": h2, "status": "delivered", "messages": 2, "bytes": 150},
        {"hour": h1, "status": "delivered", "messages": 1, "bytes": 7},
    ]
    assert store.hourly_stats("acme", now - timedelta(minutes=90), now) == hours[2:]


def test_export_pages_are_bounded_and_complete_across_equal_times(store: ClickHouseStore) -> None:
    at = datetime.now(UTC) - timedelta(hours=1)
    same_ms = [event(received_at=format_time(at)) for _ in range(23)]
    later = [event(received_at=format_time(at + timedelta(seconds=i))) for i in range(1, 6)]
    store.insert_events([*same_ms, *later])
    store.insert_events(same_ms[:3])  # unmerged duplicates are exported once
    pages = list(store.export_pages("acme", page=7))
    assert all(len(p) <= 7 for p in pages)
    got = [m for p in pages for m in p]
    assert len(got) == len(same_ms) + len(later) == store.count_export("acme")
    # Each exactly once, oldest first (ties in ClickHouse's UUID order, whatever it is).
    by_id = {e.event_id: e.to_dict() for e in [*same_ms, *later]}
    assert sorted(m["event_id"] for m in got) == sorted(by_id)
    assert all(m == by_id[m["event_id"]] for m in got)
    assert [m["event_id"] for m in got[len(same_ms) :]] == [e.event_id for e in later]
    window = [
        m["event_id"]
        for p in store.export_pages("acme", at + timedelta(seconds=2), at + timedelta(seconds=4))
        for m in p
    ]
    assert window == [later[1].event_id, later[2].event_id]


def test_hourly_migrations_backfill_once(dsn: str) -> None:
    ev = event()
    hour = datetime.now(UTC) - timedelta(hours=1)
    old_hour = (hour - timedelta(days=100)).replace(minute=0, second=0, microsecond=0)
    # A database from before the aggregates existed, with a row in it.
    with ClickHouseStore(dsn, RETENTION, apply_migrations=False) as old:
        migrate(old._command, old._rows, tuple(m for m in MIGRATIONS if m.version < 5))
        old._command(
            "INSERT INTO messages (event_id, received_at, customer_id, status, policy_version,"
            " retention_days, size_bytes) SELECT {e:UUID}, now64(3), 'acme', 'delivered', 1, 60, 9",
            {"e": ev.event_id},
        )
        before_6 = tuple(m for m in MIGRATIONS if m.version < 6)
        migrate(old._command, old._rows, before_6)
        # A re-run of step 5 (crash before the ledger entry) must not count it again.
        [m5] = [m for m in MIGRATIONS if m.version == 5]
        for sql in m5.statements:
            old._command(sql)
        summed = "SELECT sum(messages) FROM messages_hourly WHERE customer_id = 'acme'"
        assert old._rows(summed)[0][0] == 1
        # An hour whose rows have expired lives only in the summing table.
        old._command(
            "INSERT INTO messages_hourly SELECT 'acme', {h:DateTime('UTC')}, 'bounced', 4, 40",
            {"h": old_hour},
        )
        # Migration 6 ran, then a crash before its ledger entry: the next start runs it
        # again (and those after it, 9's per-event dedup included).
        [m6] = [m for m in MIGRATIONS if m.version == 6]
        for sql in m6.statements:
            old._command(sql)
    with ClickHouseStore(dsn, RETENTION) as store:  # migration 6: per-event counts
        stats = store.hourly_stats("acme", old_hour, hour + timedelta(hours=2))
        assert [(s["status"], s["messages"], s["bytes"]) for s in stats] == [
            ("bounced", 4, 40),
            ("delivered", 1, 9),
        ]
        assert store.migrate() == []
        [row] = store.query_messages("acme")
        store.insert_events([Event(**row)])  # a copy now: the view counts it once
        assert store.hourly_stats("acme", old_hour, hour + timedelta(hours=2)) == stats


def test_hourly_stats_count_each_event_once(store: ClickHouseStore, raw: Client) -> None:
    """Redelivery (both insert paths), a sink restart mid-batch and a retroactive rewrite
    insert copies of stored events: the stats count each event once (issue 14.10)."""
    now = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
    at = format_time(now - timedelta(hours=1))
    batch = [event(received_at=at, size_bytes=100 + i) for i in range(5)]
    bounced = event(received_at=at, status="bounced", size_bytes=7)
    store.insert_events([*batch, bounced])
    window = (now - timedelta(hours=2), now + timedelta(hours=1))
    before = store.hourly_stats("acme", *window)
    hour = format_time(now.replace(minute=0) - timedelta(hours=1))
    assert before == [
        {"hour": hour, "status": "bounced", "messages": 1, "bytes": 7},
        {"hour": hour, "status": "delivered", "messages": 5, "bytes": 510},
    ]
    store.insert_events(batch)  # the whole batch redelivered
    prepared = store.prepare_json([encode_event(e) for e in batch[:3]])  # the sink's fast path
    assert prepared is not None and store.insert_prepared(prepared) == 3  # restart mid-batch
    assert store.hourly_stats("acme", *window) == before

    def drop_subject(row: dict[str, object]) -> dict[str, object] | None:
        return {**row, "subject": None}

    # One rewrite per event (its surviving copy), however many copies are unmerged.
    assert store.rewrite_stored("acme", [3], 4, drop_subject) == 6
    assert store.hourly_stats("acme", *window) == before
    store.insert_events([bounced])  # an old copy redelivered after the rewrite
    assert store.hourly_stats("acme", *window) == before
    store.force_ttl_merge()
    assert store.hourly_stats("acme", *window) == before

    # Erasing an address keeps the counts (they hold no personal data); erasing everything
    # removes them.
    assert store.erase("acme", message_ids=[str(bounced.message_id)]).rows == 1
    assert store.hourly_stats("acme", *window) == before
    assert store.erase("acme", everything=True).aggregate_rows > 0
    assert store.hourly_stats("acme", *window) == []


def test_a_rewrite_does_not_bring_back_an_event_erased_meanwhile(store: ClickHouseStore) -> None:
    """The rewrite's insert goes through the erasure log like the sink's: an event erased
    while its rewritten copy is being prepared stays erased."""
    kept, gone = event(), event(message_id="<erase-me@mx.example>")
    store.insert_events([kept, gone])

    def erase_then_rewrite(row: dict[str, object]) -> dict[str, object] | None:
        if row["event_id"] == gone.event_id:
            store.erase("acme", message_ids=["<erase-me@mx.example>"])
        return {**row, "subject": None}

    assert store.rewrite_stored("acme", [3], 4, erase_then_rewrite) == 1
    ids = {m["event_id"] for m in store.query_messages("acme", limit=100)}
    assert gone.event_id not in ids and kept.event_id in ids
