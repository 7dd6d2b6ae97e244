"""The sink in this process: real Tansu broker -> consumer -> embedded ClickHouse -> HTTP API.

One SinkService serves the whole module (a consumer-group join costs seconds); each test
uses its own customer or message ids, so tests do not see each other's rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import clickhouse_connect
import httpx
import orjson
import pytest
from confluent_kafka import Message, Producer

from mailmeta.config import Customer, Customers
from mailmeta.local.apache_kafka import KafkaNode
from mailmeta.local.brokers import LocalBroker
from mailmeta.schema import Event, encode_drain_marker, encode_event
from mailmeta.service import SinkService
from tests.event_helpers import Redacted, raw_event
from tests.kafka_helpers import sink_settings
from tests.kafka_helpers import wait_until as wait_for  # other sink tests import it from here
from tests.test_streams_regions import read_to_end, record_bytes

PARTITIONS = 3
# A realistic policy: what is kept, masked, truncated or dropped, as in the example config.
POLICY = {
    "message_id": "keep",
    "subject": "keep",
    "date": "keep",
    "size_bytes": "keep",
    "smtp_reply": "keep",
    "processing_ms": "keep",
    "tls_version": "keep",
    "mail_from": "mask",
    "rcpt_to": "mask",
    "sender_ip": "truncate_ip",
    "helo": "drop",
}
CUSTOMERS = Customers(
    [
        Customer(
            id=cid, domains=[f"{cid}.example"], retention_days=days, policy=POLICY, policy_version=4
        )
        for cid, days in [
            ("order", 60),
            ("filter", 60),
            ("dup", 60),
            ("expiry", 60),
            ("drain", 60),
            ("dead", 60),
        ]
    ]
)


# What the sink receives: raw events through the real redactor.
redacted = Redacted(CUSTOMERS)


@pytest.fixture(scope="module")
def sink(
    module_broker: LocalBroker | KafkaNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SinkService]:
    tmp = tmp_path_factory.mktemp("sink")
    settings = sink_settings(module_broker.bootstrap, tmp, CUSTOMERS, "sink", partitions=PARTITIONS)
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
    p.close()


def produce(producer: Producer, topic: str, values: list[bytes], partition: int = 0) -> None:
    for v in values:
        producer.produce(topic, v, partition=partition)
    assert producer.flush(15) == 0, "broker did not acknowledge every record"


@pytest.fixture
def api(sink: SinkService) -> Iterator[httpx.Client]:
    assert sink.settings.operator_token_file is not None
    token = sink.settings.operator_token_file.read_text().strip()  # written by the sink
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=sink.url, timeout=10, headers=headers) as client:
        yield client


def send(producer: Producer, sink: SinkService, events: list[Event], partition: int = 0) -> None:
    produce(producer, sink.settings.redacted_topic, [encode_event(e) for e in events], partition)


def messages(api: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    r = api.get("/v1/messages", params=params)
    assert r.status_code == 200, r.text
    return r.json()["messages"]  # type: ignore[no-any-return]


def visible(api: httpx.Client, customer: str, event_ids: list[str]) -> bool:
    got = {m["event_id"] for m in messages(api, customer=customer, limit=1000)}
    return set(event_ids) <= got


def test_events_land_newest_first_with_every_field(
    sink: SinkService, api: httpx.Client, producer: Producer
) -> None:
    events = [redacted("order", age=timedelta(seconds=s)) for s in (30, 10, 20)]
    events[1].rcpt_to = None  # dropped by policy: comes back null
    for i, e in enumerate(events):
        send(producer, sink, [e], partition=i % PARTITIONS)
    wait_for(lambda: visible(api, "order", [e.event_id for e in events]), what="events")

    got = messages(api, customer="order")
    expected = sorted(events, key=lambda e: e.received_at, reverse=True)
    assert got == [e.to_dict() for e in expected]


def test_message_id_filter_and_limit(
    sink: SinkService, api: httpx.Client, producer: Producer
) -> None:
    events = [redacted("filter", age=timedelta(seconds=s)) for s in range(5)]
    send(producer, sink, events)
    wait_for(lambda: visible(api, "filter", [e.event_id for e in events]), what="events")

    one = messages(api, customer="filter", message_id=events[2].message_id)
    assert [m["event_id"] for m in one] == [events[2].event_id]
    assert messages(api, customer="filter", message_id="<nothing@here>") == []
    two = messages(api, customer="filter", limit=2)
    assert [m["event_id"] for m in two] == [events[0].event_id, events[1].event_id]
    assert len(messages(api, customer="filter", limit=1000)) == 5


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"customer": ""},
        {"customer": "filter", "limit": "0"},
        {"customer": "filter", "limit": "1001"},
        {"customer": "filter", "limit": "ten"},
        {"customer": "filter", "limit": "-1"},
        {"customer": "filter", "message_id": "x" * 2000},
        {"customer": "c" * 500},
    ],
)
def test_bad_parameters_are_4xx_json(api: httpx.Client, params: dict[str, str]) -> None:
    r = api.get("/v1/messages", params=params)
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]


def test_unknown_customer_is_404(api: httpx.Client) -> None:
    r = api.get("/v1/messages", params={"customer": "nobody"})
    assert r.status_code == 404
    assert r.json() == {"error": "unknown customer"}
    r = api.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]


def test_healthz(api: httpx.Client) -> None:
    r = api.get("/healthz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert body["clickhouse"] == "ok"
    assert body["consumer"]["state"] in ("running", "retrying")


def test_redelivered_event_shows_once(
    sink: SinkService, api: httpx.Client, producer: Producer
) -> None:
    ev = redacted("dup")
    later = redacted("dup")
    # The same event three times, then one more: once that is visible, all were consumed.
    send(producer, sink, [ev, ev, ev, later])
    wait_for(lambda: visible(api, "dup", [later.event_id]), what="events")
    got = messages(api, customer="dup")
    assert sorted(m["event_id"] for m in got) == sorted([ev.event_id, later.event_id])


def test_expired_event_is_stored_but_never_returned(
    sink: SinkService, api: httpx.Client, producer: Producer
) -> None:
    assert sink.store is not None
    raw = clickhouse_connect.get_client(dsn=sink.settings.resolved_dsn())
    try:
        # Hold background TTL merges so the expired row is certainly on disk meanwhile.
        raw.command("SYSTEM STOP TTL MERGES messages")
        expired = redacted("expiry", age=timedelta(days=61))  # "expiry" keeps 60 days
        live = redacted("expiry", age=timedelta(days=59))
        send(producer, sink, [expired, live])
        wait_for(lambda: visible(api, "expiry", [live.event_id]), what="live event")

        assert sink.store.count("expiry") == 2  # inserted ...
        got = messages(api, customer="expiry")
        assert [m["event_id"] for m in got] == [live.event_id]  # ... but never returned
        assert messages(api, customer="expiry", message_id=expired.message_id) == []

        raw.command("SYSTEM START TTL MERGES messages")
        sink.store.force_ttl_merge()
        rows = raw.query(
            "SELECT toString(event_id) FROM messages WHERE customer_id = {c:String}",
            parameters={"c": "expiry"},
        ).result_rows
        assert rows == [(live.event_id,)]  # physically gone
    finally:
        raw.command("SYSTEM START TTL MERGES messages")
        raw.close()


def test_invalid_records_go_to_deadletter_without_their_payload(
    sink: SinkService, api: httpx.Client, producer: Producer
) -> None:
    """A record the sink cannot store is dead-lettered as why, which event and where, never
    its payload: the raw (unredacted) one holds clear metadata, and the dead-letter topic
    keeps days."""
    canary = f"canary{uuid.uuid4().hex}"
    raw = raw_event(
        "dead",
        mail_from=f"{canary}@sender.example",
        rcpt_to=[f"{canary}@dead.example"],
        subject=f"Subject {canary}",
        helo=f"{canary}.sender.example",
        message_id=f"<{canary}@sender.example>",
        sender_ip="203.0.113.77",
    )
    unknown = replace(redacted("dead"), customer_id="no-such-customer")
    bad = [
        b"not json at all " + canary.encode(),
        b'{"event_id": "x", "surprise": "' + canary.encode() + b'"}',  # not schema v1
        # Records no redactor writes: the sink must refuse them, not store them.
        encode_event(unknown),  # no retention
        encode_event(raw),  # never went through redaction
        encode_event(replace(redacted("dead"), event_id="123", subject=canary)),
    ]
    seen = read_to_end(sink.settings.kafka_bootstrap, sink.settings.deadletter_topic)
    before = {(m.partition(), m.offset()) for m in seen}
    good = redacted("dead")
    produce(producer, sink.settings.redacted_topic, bad, partition=1)
    send(producer, sink, [good], partition=1)
    wait_for(lambda: visible(api, "dead", [good.event_id]), what="the good event")

    # A batch's dead letters are sent right after its insert: wait for five more, then read
    # the topic to its end again: exactly five more, no copy, nothing else.
    def dead_letters() -> list[Message]:
        return read_to_end(sink.settings.kafka_bootstrap, sink.settings.deadletter_topic)

    wait_for(lambda: len(dead_letters()) >= len(before) + len(bad), what="the dead letters")
    letters = dead_letters()
    assert len(letters) == len(before) + len(bad)
    for m in letters:
        for secret in (canary.encode(), b"203.0.113"):
            assert secret not in record_bytes(m), (secret, m.value())
    new = [m for m in letters if (m.partition(), m.offset()) not in before]
    mine = [orjson.loads(m.value() or b"") for m in new]
    assert sorted((d["event_id"] or "", d["customer_id"] or "") for d in mine) == sorted(
        [
            ("", ""),  # not JSON: no ids
            ("", ""),  # "x" is no event id
            (unknown.event_id, ""),  # a customer not configured is not named
            (raw.event_id, "dead"),
            ("", "dead"),
        ]
    )
    for m, d in zip(new, mine, strict=True):
        assert set(d) == {"reason", "event_id", "customer_id", "topic", "partition", "offset"}
        assert d["reason"] and d["topic"] == sink.settings.redacted_topic and d["partition"] == 1
        headers = dict(m.headers() or [])
        assert headers["mailmeta-error"].decode() == d["reason"]
        source = f"{sink.settings.redacted_topic}/1@{d['offset']}"
        assert headers["mailmeta-source"].decode() == source
    assert len({d["offset"] for d in mine}) == len(bad)
    assert [m["event_id"] for m in messages(api, customer="dead")] == [good.event_id]


def test_drained_only_after_everything_before_the_markers_is_queryable(
    sink: SinkService, api: httpx.Client, producer: Producer
) -> None:
    nonce = uuid.uuid4().hex
    per_partition = {q: [redacted("drain") for _ in range(3)] for q in range(PARTITIONS)}
    for q, events in per_partition.items():
        send(producer, sink, events, partition=q)
    pairs = [(q, p) for q in range(PARTITIONS) for p in range(PARTITIONS)]
    topic = sink.settings.redacted_topic
    for q, p in pairs[:-1]:
        produce(producer, topic, [encode_drain_marker(nonce, p)], partition=q)

    def status() -> dict[str, Any]:
        r = api.get(f"/internal/drain/{nonce}")
        assert r.status_code == 200
        return r.json()  # type: ignore[no-any-return]

    seen = wait_for(
        lambda: (s := status())["markers_seen"] == len(pairs) - 1 and s, what="8 markers"
    )
    assert seen["drained"] is False  # one (q, p) is still missing
    assert status()["drained"] is False

    last_q, last_p = pairs[-1]
    late = redacted("drain")  # before the last marker in its partition
    send(producer, sink, [late], partition=last_q)
    produce(producer, topic, [encode_drain_marker(nonce, last_p)], partition=last_q)
    wait_for(lambda: status()["drained"], what="drained")
    # The moment it says drained, everything produced before the markers is queryable.
    ids = [e.event_id for evs in per_partition.values() for e in evs] + [late.event_id]
    assert visible(api, "drain", ids)
    assert api.get("/internal/drain/other-nonce").json() == {
        "nonce": "other-nonce",
        "drained": False,
        "markers_seen": 0,
        "markers_expected": len(pairs),
    }
