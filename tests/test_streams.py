"""The faust redaction worker through a real broker: raw -> policy -> redacted / dead letters."""

from __future__ import annotations

import hashlib
import hmac

import orjson
import pytest

from mailmeta.config import Settings, load_customers
from mailmeta.local.brokers import LocalBroker
from mailmeta.schema import (
    Event,
    decode_event,
    encode_drain_marker,
    encode_event,
    new_event_id,
    now_ms,
)
from tests.kafka_helpers import consume, produce, run_stage

pytestmark = pytest.mark.slow


def _raw_event(**kw: object) -> Event:
    base: dict[str, object] = dict(
        event_id=new_event_id(),
        received_at=now_ms(),
        customer_id="demo",
        status="accepted",
        sender_ip="198.51.100.23",
        helo="mx.sender.example",
        mail_from="alice@sender.example",
        rcpt_to=["jane@demo.example"],
        message_id="<m1@sender.example>",
        subject="Hello",
        size_bytes=321,
    )
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


def test_worker_redacts_and_dead_letters(settings: Settings) -> None:
    key = load_customers(settings.config).by_id["demo"].key_bytes()
    good = _raw_event()
    unknown_customer = _raw_event(customer_id="nobody")
    produce(settings.kafka_bootstrap, settings.raw_topic, [
        encode_event(good),
        b"this is not json",
        b'{"event_id": "x", "body": "smuggled"}',
        encode_event(unknown_customer),
    ])  # fmt: skip
    with run_stage("mailmeta.streams", settings, "Worker]: Ready"):
        redacted = consume(settings.kafka_bootstrap, settings.redacted_topic, 1, timeout=45)
        dead = consume(settings.kafka_bootstrap, settings.deadletter_topic, 3, timeout=20)
    assert len(redacted) == 1
    out = decode_event(redacted[0].value())
    assert out.event_id == good.event_id
    assert out.mail_from == hmac.new(key, b"alice@sender.example", hashlib.sha256).hexdigest()
    assert out.rcpt_to == ["j***@demo.example"]
    assert out.sender_ip == "198.51.100.0/24"
    assert out.helo is None
    assert out.subject == "Hello" and out.message_id == "<m1@sender.example>"
    assert out.policy_version == 1
    # Every bad record reaches the dead-letter topic with its reason, none passes unredacted.
    assert len(dead) == 3
    reasons = sorted(dict(m.headers() or [])["mailmeta-error"].decode() for m in dead)
    assert any("not JSON" in r for r in reasons)
    assert any("unknown field(s): body" in r for r in reasons)
    assert any("no policy for customer 'nobody'" in r for r in reasons)


def test_drain_marker_reaches_every_redacted_partition(settings: Settings) -> None:
    events = [_raw_event() for _ in range(30)]
    produce(settings.kafka_bootstrap, settings.raw_topic, [encode_event(e) for e in events])
    for p in range(settings.partitions):
        produce(
            settings.kafka_bootstrap, settings.raw_topic, [encode_drain_marker("n1")], partition=p
        )
    n = settings.partitions
    with run_stage("mailmeta.streams", settings, "Worker]: Ready"):
        got = consume(settings.kafka_bootstrap, settings.redacted_topic, 30 + n * n, timeout=45)
    markers = [
        (m.partition(), orjson.loads(m.value()))
        for m in got
        if m.value().startswith(b'{"_control"')
    ]
    assert sorted((q, obj["from"]) for q, obj in markers) == sorted(
        (q, p) for q in range(n) for p in range(n)
    )
    # In each partition, the marker from a source comes after every event from that source.
    assert len(got) - len(markers) == 30


@pytest.mark.noida
@pytest.mark.parametrize("broker", ["noida"], indirect=True)
def test_worker_on_noida(broker: LocalBroker, settings: Settings) -> None:
    good = _raw_event()
    produce(settings.kafka_bootstrap, settings.raw_topic, [encode_event(good)])
    with run_stage("mailmeta.streams", settings, "Worker]: Ready"):
        redacted = consume(settings.kafka_bootstrap, settings.redacted_topic, 1, timeout=45)
    assert [decode_event(m.value()).event_id for m in redacted] == [good.event_id]
