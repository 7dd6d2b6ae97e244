"""Retention, erasure, export, stats and history through the running sink's API and the CLI.

One SinkService (real Tansu broker, embedded ClickHouse) serves the module; each test has
its own customer. The CLI runs as a subprocess against the API, as an operator would.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import clickhouse_connect
import httpx
import orjson
import pytest
from confluent_kafka import Producer

from mailmeta.config import Customer, Customers
from mailmeta.local.apache_kafka import KafkaNode
from mailmeta.local.brokers import LocalBroker
from mailmeta.local.process import free_port
from mailmeta.schema import FIELD_NAMES, Event, encode_event, format_time
from mailmeta.service import SinkService
from tests.event_helpers import Redacted
from tests.kafka_helpers import sink_settings
from tests.test_sink import wait_for

KEY = "storage-test-hmac-key-0123456789"
# Senders hashed, recipients and message ids kept: erasure by a clear address must match both.
POLICY = {
    "mail_from": "hmac",
    "rcpt_to": "keep",
    "message_id": "keep",
    "subject": "keep",
    "size_bytes": "keep",
    "smtp_reply": "keep",
    "sender_ip": "truncate_ip",
}
CUSTOMERS = Customers(
    [
        Customer(id=cid, domains=[f"{cid}.example"], retention_days=60, hmac_key=KEY, policy=POLICY)
        for cid in ("ret", "erase", "wipe", "bulk", "stats", "hist", "bad")
    ]
)
redacted = Redacted(CUSTOMERS)


@pytest.fixture(scope="module")
def sink(
    module_broker: LocalBroker | KafkaNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SinkService]:
    tmp = tmp_path_factory.mktemp("storage")
    settings = sink_settings(module_broker.bootstrap, tmp, CUSTOMERS, "storage")
    service = SinkService(settings, CUSTOMERS, group_id=f"{settings.raw_topic}-sink").start()
    try:
        yield service
    finally:
        assert service.stop(), "sink did not stop cleanly in time"


@pytest.fixture(scope="module")
def producer(module_broker: LocalBroker | KafkaNode) -> Iterator[Producer]:
    p = Producer({"bootstrap.servers": module_broker.bootstrap, "acks": "all"})
    yield p
    p.flush(5)


@pytest.fixture
def api(sink: SinkService) -> Iterator[httpx.Client]:
    token = operator_token(sink)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=sink.url, timeout=30, headers=headers) as client:
        yield client


def operator_token(sink: SinkService) -> str:
    """The operator token the sink wrote on start (mode 0600), as `mailmeta up` does."""
    assert sink.settings.operator_token_file is not None
    return sink.settings.operator_token_file.read_text().strip()


def cli_env(sink: SinkService) -> dict[str, str]:
    # The CLI finds the operator token in MAILMETA_DATA_DIR, as an operator's shell would.
    return dict(os.environ, MAILMETA_DATA_DIR=str(sink.settings.data_dir))


def send(producer: Producer, sink: SinkService, events: list[Event]) -> None:
    for e in events:
        producer.produce(sink.settings.redacted_topic, encode_event(e), partition=0)
    assert producer.flush(15) == 0


def event_ids(api: httpx.Client, customer: str) -> set[str]:
    r = api.get("/v1/messages", params={"customer": customer, "limit": 1000})
    assert r.status_code == 200, r.text
    return {m["event_id"] for m in r.json()["messages"]}


def cli(sink: SinkService, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailmeta", *args, "--api", sink.url],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=cli_env(sink),
    )


def physical(sink: SinkService, customer: str) -> dict[str, int]:
    client = clickhouse_connect.get_client(dsn=sink.settings.resolved_dsn())
    try:
        rows = client.query(
            "SELECT toString(event_id), retention_days FROM messages WHERE customer_id = {c:String}",
            parameters={"c": customer},
        ).result_rows
    finally:
        client.close()
    return {e: d for e, d in rows}


def test_retention_set_reaches_stored_rows_and_the_running_sink(
    sink: SinkService, api: httpx.Client, producer: Producer
) -> None:
    before = [redacted("ret", age=timedelta(days=d)) for d in (1, 20)]
    send(producer, sink, before)
    wait_for(lambda: {e.event_id for e in before} <= event_ids(api, "ret"), what="events")

    done = cli(sink, "retention", "set", "ret", "10")
    assert done.returncode == 0, done.stderr
    assert (
        "ret: retention 60 -> 10 days; 1 stored row(s) updated, 1 removed as expired" in done.stdout
    )
    assert physical(sink, "ret") == {before[0].event_id: 10}
    # The running sink stores new rows with the new retention.
    after = redacted("ret")
    send(producer, sink, [after])
    wait_for(lambda: after.event_id in event_ids(api, "ret"), what="new event")
    assert physical(sink, "ret")[after.event_id] == 10
    shown = cli(sink, "retention", "show")
    assert "ret\t10 days" in shown.stdout
    assert sink.store is not None
    # Other features audit too (e.g. API access); these are this one's records.
    [audit] = [a for a in sink.store.read_audit("ret") if a["action"] == "retention.set"]
    assert audit["details"] == {
        "from_days": 60,
        "to_days": 10,
        "rows_updated": 1,
        "rows_expired": 1,
    }

    bad = cli(sink, "retention", "set", "ret", "0")
    assert bad.returncode == 2 and "Invalid value" in bad.stderr and "days" in bad.stderr
    r = api.put("/v1/retention/ret", json={"days": 5000})
    assert r.status_code == 400 and r.json()["problems"][0]["param"] == "days"
    r = api.put("/v1/retention/ret", json={"days": 5, "extra": 1})
    assert r.status_code == 400
    unknown = cli(sink, "retention", "set", "nobody", "5")
    assert unknown.returncode == 1 and "404: unknown customer" in unknown.stderr
    assert sink.store.retention()["ret"] == 10  # nothing half-applied


def test_erase_by_clear_address_matches_hmac_stored_rows(
    sink: SinkService, api: httpx.Client, producer: Producer
) -> None:
    alice = "alice@sender.example"
    rows = [
        redacted("erase", mail_from=alice),  # stored hashed
        redacted("erase", mail_from="carol@sender.example", rcpt_to=[alice]),  # kept clear
        redacted("erase", mail_from="bob@sender.example"),
    ]
    hashed = redacted.hashed("erase", alice)
    assert rows[0].mail_from == hashed and rows[1].rcpt_to == [alice]
    send(producer, sink, rows)
    wait_for(lambda: {e.event_id for e in rows} <= event_ids(api, "erase"), what="events")

    done = cli(sink, "erase", "--customer", "erase", "--address", "Alice@Sender.example")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "erase: erased 2 row(s)"
    assert set(physical(sink, "erase")) == {rows[2].event_id}
    by_mid = cli(sink, "erase", "--customer", "erase", "--message-id", rows[2].message_id or "")
    assert by_mid.stdout.strip() == "erase: erased 1 row(s)"
    assert physical(sink, "erase") == {}
    assert sink.store is not None
    audit = [a for a in sink.store.read_audit("erase") if a["action"] == "erase"]
    assert [a["details"] for a in audit] == [
        {"scope": "message_id", "rows_removed": 1},
        {"scope": "address", "rows_removed": 2},
    ]
    text = orjson.dumps(audit).decode().lower()
    assert "alice" not in text and hashed not in text and str(rows[2].message_id) not in text

    for args in ([], ["--address", "a@b.c", "--all"]):
        bad = cli(sink, "erase", "--customer", "erase", *args)
        assert bad.returncode == 2 and "exactly one of" in bad.stderr
    r = api.post("/v1/erase", json={"customer": "erase", "address": "no-at-sign"})
    assert r.status_code == 400 and "address" in r.text
    r = api.post("/v1/erase", json={"customer": "nobody", "all": True})
    assert r.status_code == 404


def test_erase_all_removes_rows_and_aggregates_through_the_cli(
    sink: SinkService, api: httpx.Client, producer: Producer
) -> None:
    rows = [redacted("wipe") for _ in range(3)]
    send(producer, sink, rows)
    wait_for(lambda: {e.event_id for e in rows} <= event_ids(api, "wipe"), what="events")
    assert api.get("/v1/stats", params={"customer": "wipe"}).json()["totals"]
    done = cli(sink, "erase", "--customer", "wipe", "--all", "--yes")
    assert done.returncode == 0, done.stderr
    # Policy history, tokens and audit: tests/test_api_erase.py checks each table.
    assert done.stdout.startswith("wipe: erased 3 row(s), ")
    assert " aggregate row(s), " in done.stdout and "token(s) revoked" in done.stdout
    assert physical(sink, "wipe") == {}
    assert api.get("/v1/stats", params={"customer": "wipe"}).json()["totals"] == {}
    assert sink.store is not None
    assert [a["action"] for a in sink.store.read_audit("wipe")] == ["erase"]
    refused = cli(sink, "erase", "--customer", "wipe", "--all")  # no TTY, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr


def test_export_100k_rows_streams_in_bounded_memory_and_round_trips(
    sink: SinkService, api: httpx.Client, tmp_path: Path
) -> None:
    assert sink.store is not None
    base = datetime.now(UTC) - timedelta(days=1)
    events = [
        redacted(
            "bulk",
            received_at=format_time(base + timedelta(milliseconds=i)),
            subject=f'Grüße #{i} "quoted", comma\nnewline ✓',
            rcpt_to=[f"r{i}@x.example", "\u00e9@y.example"] if i % 3 else None,
            size_bytes=None if i % 7 == 0 else i,
        )
        for i in range(100_000)
    ]
    for i in range(0, len(events), 20_000):  # direct inserts: the export is under test
        sink.store.insert_events(events[i : i + 20_000])
    expected = {e.event_id: e.to_dict() for e in events}

    tracemalloc.start()
    try:
        n = 0
        chunks = 0
        buf = b""
        with api.stream("GET", "/v1/export", params={"customer": "bulk"}) as r:
            assert r.status_code == 200
            assert r.headers["x-mailmeta-rows"] == "100000"
            for chunk in r.iter_bytes():
                chunks += 1
                buf += chunk
                lines = buf.split(b"\n")
                buf = lines.pop()
                for line in lines:
                    m = orjson.loads(line)
                    assert m == expected[m["event_id"]]
                    n += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert buf == b"" and n == 100_000
    assert chunks > 10  # streamed, not one body
    # The whole export as JSON is ~60 MB (and several times that as Python objects).
    assert peak < 40_000_000, f"peak {peak / 1e6:.1f} MB"

    out = tmp_path / "bulk.csv"
    done = subprocess.run(
        [sys.executable, "-m", "mailmeta", "export", "--customer", "bulk", "--format", "csv",
         "--from", format_time(base), "--to", format_time(base + timedelta(seconds=5)),
         "--out", str(out), "--api", sink.url],
        capture_output=True, text=True, timeout=120, env=cli_env(sink),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "exported 5000 row(s)" in done.stderr
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(FIELD_NAMES)
    assert len(rows) == 5001
    for row in rows[1:]:
        m = dict(zip(FIELD_NAMES, row, strict=True))
        want = expected[m["event_id"]]
        assert m["subject"] == want["subject"]
        assert m["rcpt_to"] == (orjson.dumps(want["rcpt_to"]).decode() if want["rcpt_to"] else "")
        assert m["size_bytes"] == ("" if want["size_bytes"] is None else str(want["size_bytes"]))
    assert not list(tmp_path.glob(".*partial"))


def test_export_and_stats_refuse_bad_input_and_leave_no_file(
    sink: SinkService, api: httpx.Client, tmp_path: Path
) -> None:
    out = tmp_path / "x.jsonl"
    for args, message in [
        (["--from", "yesterday"], "--from: 'yesterday' is not an ISO-8601"),
        (["--from", "2026-01-02", "--to", "2026-01-01"], "'from' must be before 'to'"),
        (["--format", "xml"], "xml"),
    ]:
        done = cli(sink, "export", "--customer", "bad", "--out", str(out), *args)
        assert done.returncode != 0 and message in done.stderr, done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    for path, params in [
        ("/v1/export", {"customer": "bad", "format": "xml"}),
        ("/v1/export", {"customer": "bad", "from": "soon"}),
        ("/v1/stats", {"customer": "bad", "from": "2020-01-01", "to": "2026-01-01"}),
        ("/v1/stats", {}),
    ]:
        r = api.get(path, params=params)
        assert r.status_code == 400, (path, params, r.text)
        assert r.json()["error"]
    assert api.get("/v1/export", params={"customer": "nobody"}).status_code == 404


def test_stats_and_history_through_the_api(
    sink: SinkService, api: httpx.Client, producer: Producer
) -> None:
    mid = "<hist@sender.example>"
    deferred = redacted("hist", age=timedelta(seconds=20), message_id=mid, status="deferred")
    delivered = redacted("hist", age=timedelta(seconds=5), message_id=mid, status="delivered")
    other = redacted("hist", age=timedelta(seconds=10), status="bounced", size_bytes=10)
    send(producer, sink, [deferred, other, delivered, delivered])
    wait_for(lambda: {delivered.event_id, other.event_id} <= event_ids(api, "hist"), what="events")

    # The later status events are stored too; the dashboard API shows the history, where
    # the redelivered copy appears once and the newest event is the current status.
    r = api.get(f"/v1/messages/{deferred.event_id}", params={"customer": "hist"})
    assert r.status_code == 200, r.text
    history = r.json()["history"]
    assert [h["event_id"] for h in history] == [deferred.event_id, delivered.event_id]
    assert history[-1]["status"] == "delivered"

    stats: dict[str, Any] = api.get("/v1/stats", params={"customer": "hist"}).json()
    # Hourly aggregates count events: the copy redelivered within a batch counts once.
    assert stats["totals"]["bounced"] == {"messages": 1, "bytes": 10}
    assert stats["totals"]["deferred"]["messages"] == 1
    assert stats["totals"]["delivered"]["messages"] == 1
    assert {h["status"] for h in stats["hours"]} == {"bounced", "deferred", "delivered"}


def test_cli_reports_an_unreachable_api() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mailmeta", "retention", "show", "--api", f"http://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "cannot reach the mailmeta API" in done.stderr
