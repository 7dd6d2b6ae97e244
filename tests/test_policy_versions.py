"""A policy version names one document, and the API refuses what a worker would (issue 21.1).

Real components: the API served over HTTP on a real Apache Kafka policies topic and an
embedded ClickHouse; the worker's own decoder and redactor; rows from the real redactor
stored through the store as the sink stores them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from mailmeta.api import TokenAuthority, create_api, install_policies
from mailmeta.config import MAX_POLICY_BYTES, Policy, Settings
from mailmeta.local.process import free_port
from mailmeta.policy import (
    POLICY_PARTITION,
    PolicyConflict,
    PolicyLog,
    PolicyRecord,
    PolicyRecordError,
    Redactor,
    TopicReader,
    decode_record,
)
from mailmeta.policy._redact import compile_for
from mailmeta.schema import Event
from mailmeta.sinks import DrainState
from tests.api_helpers import CUSTOMERS, ApiServer
from tests.event_helpers import Redacted, raw_event

pytestmark = [pytest.mark.kafka, pytest.mark.parametrize("broker", ["kafka"], indirect=True)]

ISSUE_RULES_OVERRIDE = {
    "actions": {"subject": "keep", "rcpt_to": "keep", "message_id": "keep", "size_bytes": "keep"},
    "rules": {"size_bytes": {"action": "hmac"}},
}
BIG_RULES = [{"pattern": "p" * 500, "with": "w" * 200} for _ in range(100)]

# (customer, document, refused): acme has an HMAC key, globex none.
CORPUS: list[tuple[str, Any, bool]] = [
    ("acme", {"subject": "keep", "rcpt_to": "keep", "message_id": "keep"}, False),
    ("acme", {"mail_from": "hmac", "subject": "length_only"}, False),
    ("acme", {"subject": {"action": "keep", "replace": [{"pattern": r"\d+"}]}}, False),
    ("acme", {"actions": {"subject": "keep"}, "rules": {"subject": {"action": "keep"}}}, False),
    ("acme", {"subject": {"action": "keep", "replace": [{"pattern": "x"}] * 100}}, False),
    ("acme", ISSUE_RULES_OVERRIDE, True),
    ("acme", {"actions": {"subject": "keep"}, "rules": {"subject": {"action": "drop"}}}, True),
    ("acme", {"actions": {"helo2": "keep"}}, True),
    ("acme", {"actions": {}, "rules": {"helo2": {"action": "keep"}}}, True),
    ("acme", {"actions": {}, "rules": {"customer_id": {"action": "keep"}}}, True),
    ("acme", {"actions": {"subject": "keep"}, "rules": {"mail_from": {"action": "keep"}}}, True),
    ("acme", {"customer_id": "keep"}, True),
    ("acme", {"size_bytes": "hmac"}, True),
    ("acme", {"sender_ip": "domain_only"}, True),
    ("acme", {"mail_from": {"action": "mask", "ipv4_prefix": 8}}, True),
    ("acme", {"mail_from": "hmac", "hmac_key_id": "k9"}, True),
    ("acme", {"subject": {"action": "keep", "replace": [{"pattern": "x"}] * 101}}, True),
    ("acme", {"subject": {"action": "keep", "replace": BIG_RULES}}, True),
    ("acme", {"subject": {"action": "keep", "replace": [{"pattern": "(a)\\1"}]}}, True),
    ("globex", {"mail_from": "hmac"}, True),
    ("globex", {"mail_from": "keep", "rcpt_to": "mask"}, False),
]


class Api:
    """One API replica over ``store`` with its own policy log, served over HTTP."""

    def __init__(self, primary: ApiServer, settings: Settings) -> None:
        self.auth = TokenAuthority(primary.store, rate_per_s=1000.0, burst=1000).load()
        app = create_api(primary.store, CUSTOMERS, DrainState(1), auth=self.auth)
        self.policy_log = install_policies(app, settings, CUSTOMERS, primary.store)
        self.url = f"http://127.0.0.1:{free_port()}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]), log_level="warning",
            lifespan="off",
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "replica did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.policy_log.close()
        self.auth.close()


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path)
    server.install_policies(settings, CUSTOMERS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _worker_takes(customer: str, value: bytes, version: int) -> bool:
    """What a redaction worker makes of a record: its decoder, then its redactor."""
    try:
        rec = decode_record(customer.encode(), value)
    except PolicyRecordError:
        return False
    assert rec is not None
    redactor = Redactor(CUSTOMERS)
    assert redactor.update(customer, rec.policy, rec.version)
    try:
        redactor.compiled(customer)
    except ValueError:
        return False
    return redactor.version_of(customer) == version


def test_api_refuses_exactly_what_a_worker_refuses(api: ApiServer, settings: Settings) -> None:
    assert len(orjson.dumps(BIG_RULES)) > MAX_POLICY_BYTES
    with api.client(api.operator) as op:
        for customer, doc, refused in CORPUS:
            record = orjson.dumps({"customer_id": customer, "version": 100, "policy": doc})
            worker = _worker_takes(customer, record, 100)
            checked = op.post("/v1/policies/validate", json={"policy": doc, "customer": customer})
            put = op.put(f"/v1/policies/{customer}", json={"policy": doc})
            assert (checked.status_code, put.status_code, worker) == (
                (422, 422, False) if refused else (200, 200, True)
            ), (doc, checked.text, put.text)
            if refused:
                problems = put.json()["problems"]
                assert problems and all(p["field"] and p["problem"] for p in problems), problems
            else:
                # What was published is what the worker applies.
                version = put.json()["version"]
                rec = PolicyLog(settings).read_all()[customer]
                assert rec.version == version
                assert _worker_takes(customer, rec.encode(), version)
        refused = op.put("/v1/policies/acme", json={"policy": ISSUE_RULES_OVERRIDE}).json()
    assert [p["field"] for p in refused["problems"]] == ["size_bytes"]


def test_two_writers_never_publish_one_version_twice(api: ApiServer, settings: Settings) -> None:
    second = Api(api, settings)
    n = 8
    results: dict[str, list[tuple[int, str]]] = {"a": [], "b": []}

    def write(name: str, url: str) -> None:
        headers = {"Authorization": f"Bearer {api.operator}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            for i in range(n):
                doc = {"subject": {"action": "keep", "replace": [{"pattern": f"{name}{i}"}]}}
                r = c.put("/v1/policies/acme", json={"policy": doc})
                assert r.status_code == 200, r.text
                results[name].append((r.json()["version"], Policy.model_validate(doc).digest()))

    try:
        threads = [
            threading.Thread(target=write, args=("a", api.url)),
            threading.Thread(target=write, args=("b", second.url)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        second.stop()
    published = dict(results["a"] + results["b"])
    # Distinct and contiguous after the file's version 3.
    assert sorted(published) == list(range(4, 4 + 2 * n)), results
    history = api.store.policy_versions("acme")
    topic = PolicyLog(settings).read()
    assert topic.records["acme"].version == 3 + 2 * n
    for version, digest in published.items():
        assert history[version]["digest"] == digest
    # In the topic, the first record of each version is the document the history holds; a
    # writer that lost a race left a later record of that number, refused by every reader.
    first: dict[int, str] = {}
    for key, value, offset in _records(settings):
        if key == b"acme":
            rec = decode_record(key, value)
            assert rec is not None
            digest = rec.policy.digest()
            if first.setdefault(rec.version, digest) != digest:
                assert any(p["offset"] == offset for p in topic.problems["acme"])
    for version, digest in published.items():
        assert first[version] == digest


def _records(settings: Settings) -> list[tuple[bytes | None, bytes | None, int]]:
    from confluent_kafka import Consumer, TopicPartition

    from mailmeta.kafka import consumer_config

    consumer = Consumer(consumer_config(settings, "raw-policy-scan"))
    try:
        tp = TopicPartition(settings.policies_topic, POLICY_PARTITION)
        high = consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1]
        consumer.assign([TopicPartition(settings.policies_topic, POLICY_PARTITION, 0)])
        out: list[tuple[bytes | None, bytes | None, int]] = []
        deadline = time.monotonic() + 20
        while (not out or out[-1][2] + 1 < high) and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                out.append((msg.key(), msg.value(), msg.offset() or 0))
        return out
    finally:
        consumer.close()


def _produce(settings: Settings, key: bytes, value: bytes | None) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(settings.policies_topic, value, key=key, partition=POLICY_PARTITION)
    assert producer.flush(10) == 0


def test_an_unreadable_record_is_reported_never_a_deletion(
    api: ApiServer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    metric = "mailmeta_policy_invalid_records_total"
    before = REGISTRY.get_sample_value(metric, {"reader": "api"}) or 0.0
    with api.client(api.operator) as op:
        r = op.put("/v1/policies/acme", json={"policy": {"subject": "keep"}})
        assert r.status_code == 200 and r.json()["version"] == 4
        secret = "SECRET-subject-in-clear"
        bad = {"customer_id": "acme", "version": 5, "policy": {secret: "keep"}}
        with caplog.at_level(logging.ERROR):
            _produce(settings, b"acme", orjson.dumps(bad))
            shown = op.get("/v1/policies/acme").json()
        assert shown["version"] == 4 and shown["policy"] == {"subject": "keep"}
        [problem] = shown["problems"]
        assert problem["offset"] >= 1 and "invalid policy" in problem["problem"]
        assert (REGISTRY.get_sample_value(metric, {"reader": "api"}) or 0.0) > before
        logged = [r.getMessage() for r in caplog.records if "invalid policy record" in r.message]
        assert logged and all("offset" in m and secret not in m for m in logged)
        # An unreadable record names no version: the next one is 5, and it is in force.
        r = op.put("/v1/policies/acme", json={"policy": {"subject": "drop"}})
        assert r.json()["version"] == 5
        assert op.get("/v1/policies/acme").json()["policy"] == {"subject": "drop"}
        # Only a tombstone deletes: the file's policy is in force again.
        _produce(settings, b"acme", None)
        assert op.get("/v1/policies/acme").json()["version"] == 3


def test_a_version_named_twice_is_an_alarm_and_the_held_one_stays(
    api: ApiServer, settings: Settings
) -> None:
    with api.client(api.operator) as op:
        assert op.put("/v1/policies/acme", json={"policy": {"subject": "drop"}}).status_code == 200
    pl = PolicyLog(settings)
    held = pl.read_all()["acme"]
    # A stray writer (no claim) publishes version 4 again, looser.
    pl.publish([PolicyRecord("acme", 4, Policy.model_validate({"subject": "keep"}))])
    pl.close()
    reader = TopicReader("test")
    for key, value, offset in _records(settings):
        reader.add(key, value, offset)
    assert reader.state.records["acme"].policy.digest() == held.policy.digest()
    assert "published again" in reader.state.problems["acme"][0]["problem"]
    with api.client(api.operator) as op:
        assert op.get("/v1/policies/acme").json()["problems"]
    # The worker: same version, same document: nothing; another document: an alarm.
    redactor = Redactor(CUSTOMERS)
    assert redactor.update("acme", held.policy, 4)
    assert not redactor.update("acme", held.policy, 4)
    with pytest.raises(PolicyConflict):
        redactor.update("acme", Policy.model_validate({"subject": "keep"}), 4)
    # A lower version known with another document (the file's v3): an alarm too.
    with pytest.raises(PolicyConflict):
        redactor.update("acme", Policy.model_validate({"subject": "keep"}), 3)
    assert redactor.version_of("acme") == 4
    assert redactor.redact(raw_event("acme")).subject is None


def test_every_row_was_redacted_by_the_document_its_version_names(
    api: ApiServer, settings: Settings
) -> None:
    rows = Redacted(CUSTOMERS)
    raw: dict[str, Event] = {}

    def store(n: int) -> None:
        events = [raw_event("acme", subject=f"Invoice {i} for jane@acme.example") for i in range(n)]
        for e in events:
            raw[e.event_id] = e
        api.store.insert_events([rows.of(e) for e in events])

    store(2)  # under the file's version 3
    docs = [
        {"subject": {"action": "keep", "replace": [{"pattern": r"\d+", "with": "#"}]}},
        {"subject": "length_only", "mail_from": "hmac", "rcpt_to": "domain_only"},
        {"subject": "drop", "sender_ip": "truncate_ip", "message_id": "mask"},
    ]
    with api.client(api.operator) as op:
        for doc in docs:
            r = op.put("/v1/policies/acme", json={"policy": doc})
            assert r.status_code == 200, r.text
            rec = PolicyLog(settings).read_all()["acme"]  # what a worker reads
            assert rec.version == r.json()["version"]
            assert rows.redactor.update("acme", rec.policy, rec.version)
            store(3)
    history = api.store.policy_versions("acme")
    customer = CUSTOMERS.by_id["acme"]
    stored = api.store.query_messages("acme", limit=100)
    assert len(stored) == 11 and {r["policy_version"] for r in stored} == {3, 4, 5, 6}
    for row in stored:
        version = row["policy_version"]
        if version in history:
            policy = Policy.model_validate(history[version]["policy"])
        else:
            assert version == customer.policy_version  # the file's, never published again
            policy = customer.policy
        again = compile_for(customer, policy, version).apply(raw[str(row["event_id"])]).to_dict()
        for name in ("subject", "mail_from", "rcpt_to", "sender_ip", "message_id"):
            assert row[name] == again[name], (version, name)
