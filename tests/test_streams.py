"""The faust redaction worker through a real broker: raw -> policy -> redacted / dead letters."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from mailmeta.config import Settings, load_customers
from mailmeta.kafka import ensure_topics
from mailmeta.local.brokers import LocalBroker
from mailmeta.local.process import free_port
from mailmeta.schema import (
    Event,
    decode_event,
    encode_drain_marker,
    encode_event,
    new_event_id,
    now_ms,
)
from tests.kafka_helpers import consume, produce, read_to_end, run_stage

pytestmark = pytest.mark.slow


@pytest.fixture
def wsettings(settings: Settings) -> Settings:
    """The test's own policies topic: the session broker is shared by every test."""
    s = settings.model_copy(update={"policies_topic": f"{settings.raw_topic}.policies"})
    ensure_topics(s, load_customers(s.config).shortest_retention_days)
    return s


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


def test_worker_redacts_and_dead_letters(wsettings: Settings) -> None:
    settings = wsettings.model_copy(update={"streams_metrics_port": free_port()})
    key = load_customers(settings.config).by_id["demo"].key_bytes()
    good = _raw_event()
    unknown_customer = _raw_event(customer_id="nobody")
    produce(settings.kafka_bootstrap, settings.raw_topic, [
        encode_event(good),
        b"this is not json",
        b'{"event_id": "x", "body": "smuggled"}',
        encode_event(unknown_customer),
    ])  # fmt: skip
    with run_stage("mailmeta.streams", settings, "Worker]: Ready") as stage:
        consume(settings.kafka_bootstrap, settings.redacted_topic, 1, timeout=45)
        consume(settings.kafka_bootstrap, settings.deadletter_topic, 3, timeout=20)
        url = f"http://{settings.api_host}:{settings.streams_metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                metrics = r.read().decode()
        except OSError as exc:
            raise AssertionError(f"no metrics at {url}: {exc}\n{stage.output[-3000:]}") from None
    # The worker has stopped: each topic read to its end holds every record, none extra.
    redacted = read_to_end(settings.kafka_bootstrap, settings.redacted_topic)
    dead = read_to_end(settings.kafka_bootstrap, settings.deadletter_topic)
    # Counted in metrics, by reason.
    assert 'mailmeta_redaction_dead_letters_total{reason="schema"} 2.0' in metrics
    assert 'mailmeta_redaction_dead_letters_total{reason="redaction"} 1.0' in metrics
    assert "mailmeta_redaction_events_total 1.0" in metrics
    assert 'mailmeta_redaction_policy_version{customer="demo"} 1.0' in metrics
    assert len(redacted) == 1
    out = decode_event(redacted[0].value())
    assert out.event_id == good.event_id
    assert (
        out.mail_from == "k1:" + hmac.new(key, b"alice@sender.example", hashlib.sha256).hexdigest()
    )
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


def test_dead_letter_of_a_customer_without_its_key_holds_no_metadata(
    wsettings: Settings, tmp_path: Path
) -> None:
    """A worker lacking a customer's HMAC key dead-letters its events: the dead letter (kept
    days, the raw topic only hours) names the reason and the record, no address, subject or
    IP (issue 14.9)."""
    config = tmp_path / "customers.yaml"
    config.write_text(
        "customers:\n"
        "  - id: keyless\n"
        "    domains: [keyless.example]\n"
        "    retention_days: 30\n"
        "    hmac_key_env: MAILMETA_TEST_KEY_THIS_WORKER_LACKS\n"
        "    policy: {mail_from: hmac, subject: keep, sender_ip: keep, rcpt_to: keep}\n"
    )
    settings = wsettings.model_copy(update={"config": config})
    ev = _raw_event(
        customer_id="keyless",
        mail_from="alice@sender.example",
        rcpt_to=["jane@keyless.example"],
        subject="Secret merger plans",
        sender_ip="198.51.100.23",
        helo="mx.sender.example",
        message_id="<m1@sender.example>",
    )
    produce(settings.kafka_bootstrap, settings.raw_topic, [encode_event(ev)], partition=0)
    with run_stage("mailmeta.streams", settings, "Worker]: Ready"):
        [dead] = consume(settings.kafka_bootstrap, settings.deadletter_topic, 1, timeout=45)
    letter = (
        (dead.value() or b"")
        + (dead.key() or b"")
        + b"".join(v for _, v in dead.headers() or [] if isinstance(v, bytes))
    )
    for secret in (
        b"alice", b"sender.example", b"jane", b"Secret merger", b"198.51.100", b"<m1@",
    ):  # fmt: skip
        assert secret not in letter, secret
    body = orjson.loads(dead.value())
    assert body["event_id"] == ev.event_id and body["customer_id"] == "keyless"
    assert body["partition"] == 0 and body["offset"] == 0
    assert "MAILMETA_TEST_KEY_THIS_WORKER_LACKS" in body["reason"]
    assert dict(dead.headers() or [])["mailmeta-error"].decode() == body["reason"]


def test_raw_backlog_age_while_the_worker_is_down(
    wsettings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The age of the oldest unredacted raw event, against the raw topic's retention: the
    metric and the warning an operator needs before acknowledged mail expires unprocessed
    (issue 14.12)."""
    from confluent_kafka import Producer
    from prometheus_client import REGISTRY

    from mailmeta.streams._metrics import BacklogMonitor
    from mailmeta.streams.app import APP_ID

    settings = wsettings.model_copy(update={"streams_metrics_port": free_port()})
    monitor = BacklogMonitor(settings, APP_ID)
    assert monitor.check() == 0.0  # nothing waiting
    # The worker is down; events wait. One was written 3.5 h ago (raw retention: 6 h).
    age = 3.5 * 3600
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        old_ms = int((time.time() - age) * 1000)
        producer.produce(settings.raw_topic, encode_event(_raw_event()), partition=0,
                         timestamp=old_ms)  # fmt: skip
        producer.produce(settings.raw_topic, encode_event(_raw_event()), partition=1)
        assert producer.flush(15) == 0
    finally:
        producer.flush(1)
    with caplog.at_level(logging.WARNING, logger="mailmeta.streams"):
        seen = monitor.check()
    assert age <= seen < age + 120
    gauge = REGISTRY.get_sample_value("mailmeta_streams_raw_backlog_age_seconds")
    assert gauge == seen
    assert any("58% of the raw topic's retention (6 h)" in r.getMessage() for r in caplog.records)

    with run_stage("mailmeta.streams", settings, "Worker]: Ready") as stage:
        consume(settings.kafka_bootstrap, settings.redacted_topic, 2, timeout=45)
        url = f"http://{settings.api_host}:{settings.streams_metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            assert "mailmeta_streams_raw_backlog_age_seconds " in r.read().decode()
        # Once the worker committed its offsets, nothing waits.
        deadline = time.monotonic() + 30
        while monitor.check() != 0.0:
            assert time.monotonic() < deadline, stage.output[-3000:]
            time.sleep(0.5)


def test_drain_marker_reaches_every_redacted_partition(wsettings: Settings) -> None:
    settings = wsettings
    events = [_raw_event() for _ in range(30)]
    produce(settings.kafka_bootstrap, settings.raw_topic, [encode_event(e) for e in events])
    for p in range(settings.partitions):
        produce(
            settings.kafka_bootstrap, settings.raw_topic, [encode_drain_marker("n1")], partition=p
        )
    n = settings.partitions
    with run_stage("mailmeta.streams", settings, "Worker]: Ready"):
        consume(settings.kafka_bootstrap, settings.redacted_topic, 30 + n * n, timeout=45)
    got = read_to_end(settings.kafka_bootstrap, settings.redacted_topic)  # none extra
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
def test_worker_on_noida(broker: LocalBroker, wsettings: Settings) -> None:
    settings = wsettings
    good = _raw_event()
    produce(settings.kafka_bootstrap, settings.raw_topic, [encode_event(good)])
    with run_stage("mailmeta.streams", settings, "Worker]: Ready"):
        redacted = consume(settings.kafka_bootstrap, settings.redacted_topic, 1, timeout=45)
    assert [decode_event(m.value()).event_id for m in redacted] == [good.event_id]


def test_a_restarted_worker_redacts_the_first_record_after_its_committed_offset(
    wsettings: Settings,
) -> None:
    """At-least-once across worker restarts: the record at the committed offset of each
    partition is the next one read, not skipped (one lost per partition per start before)."""
    settings = wsettings
    first = [_raw_event(message_id=f"<first-{p}@sender.example>") for p in range(3)]
    later = [_raw_event(message_id=f"<later-{p}@sender.example>") for p in range(3)]
    for p, ev in enumerate(first):
        produce(settings.kafka_bootstrap, settings.raw_topic, [encode_event(ev)], partition=p)
    with run_stage("mailmeta.streams", settings, "Worker]: Ready"):
        consume(settings.kafka_bootstrap, settings.redacted_topic, 3, timeout=45)
    # The worker stopped cleanly (offsets committed); one new record in every partition.
    for p, ev in enumerate(later):
        produce(settings.kafka_bootstrap, settings.raw_topic, [encode_event(ev)], partition=p)
    with run_stage("mailmeta.streams", settings, "Worker]: Ready"):
        out = consume(settings.kafka_bootstrap, settings.redacted_topic, 6, timeout=45)
    ids = {decode_event(m.value() or b"").message_id for m in out}
    assert {ev.message_id for ev in later} <= ids
