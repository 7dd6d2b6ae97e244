"""Region pinning in the redaction worker (issue 17.4): a worker of region eu redacts only the
events of eu customers; another region's customer's event goes to the eu dead-letter topic
with the reason and none of its metadata, and another region's policy is never held here."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import orjson
import pytest
from confluent_kafka import (
    KafkaException,
    Message,
)

from mailmeta.config import TOPIC_SETTINGS, Policy, Settings, load_customers
from mailmeta.kafka import ensure_topics
from mailmeta.local.process import free_port
from mailmeta.policy import POLICY_PARTITION, PolicyLog, PolicyRecord
from mailmeta.schema import Event, decode_event, encode_event
from tests.event_helpers import raw_event
from tests.kafka_helpers import consume, produce, read_to_end, run_stage, wait_until

pytestmark = pytest.mark.slow

# Region eu is declared; "home" names no region (the default one), "acme" is pinned to eu.
CUSTOMERS_YAML = """\
regions:
  eu: {api_url: "https://eu.api.example", smtp_host: mx.eu.example}
customers:
  - id: home
    domains: [home.example]
    retention_days: 30
    policy: {mail_from: mask, rcpt_to: mask, sender_ip: truncate_ip, subject: keep,
             message_id: keep, helo: drop}
  - id: acme
    region: eu
    domains: [acme.example]
    retention_days: 60
    policy: {mail_from: mask, rcpt_to: mask, sender_ip: truncate_ip, subject: keep,
             message_id: keep, helo: drop}
"""

# What the default region's customer's event holds: none of it may reach an eu topic but raw.
HOME_SECRETS = (
    b"home.example", b"carol", b"dave", b"Board minutes", b"203.0.113", b"<q3@",
)  # fmt: skip


def customers_file(tmp_path: Path) -> Path:
    path = tmp_path / "customers.yaml"
    path.write_text(CUSTOMERS_YAML)
    return path


def eu_settings(settings: Settings, config: Path) -> Settings:
    """The test's topics as a process of region eu names them (``<topic>.eu``), created."""
    topics = {name: f"{getattr(settings, name)}.eu" for name in TOPIC_SETTINGS}
    s = settings.model_copy(update={"config": config, "region": "eu", **topics})
    ensure_topics(s, load_customers(config, "eu").shortest_retention_days)
    return s


def home_event() -> Event:
    """A raw event of the default region's customer, as its front end would write it."""
    return raw_event(
        "home",
        status="accepted",
        sender_ip="203.0.113.77",
        helo="mx.sender-home.example",
        mail_from="carol@sender-home.example",
        rcpt_to=["dave@home.example"],
        message_id="<q3@sender-home.example>",
        subject="Board minutes Q3",
        size_bytes=4096,
    )


def acme_event() -> Event:
    return raw_event(
        "acme",
        status="accepted",
        sender_ip="198.51.100.23",
        helo="mx.partner.example",
        mail_from="erin@partner.example",
        rcpt_to=["frank@acme.example"],
        message_id="<m7@partner.example>",
        subject="Delivery schedule",
        size_bytes=2048,
    )


def record_bytes(m: Message) -> bytes:
    """Value, key and header values: everything a record could carry a value in."""
    headers = b"".join(v for _, v in m.headers() or [] if isinstance(v, bytes))
    return (m.value() or b"") + (m.key() or b"") + headers


def policy_record(customer: str, version: int, policy: dict[str, str]) -> PolicyRecord:
    return PolicyRecord(
        customer,
        version,
        Policy.model_validate(policy),
        "ops@example",
        "2026-01-01T00:00:00Z",
        "api",
    )


def test_eu_worker_redacts_eu_events_and_dead_letters_the_default_regions(
    settings: Settings, tmp_path: Path
) -> None:
    s = eu_settings(settings, customers_file(tmp_path)).model_copy(
        update={"streams_metrics_port": free_port()}
    )
    # An operator's policies on the eu topic: acme's v2 applies; home's (a loosening, on the
    # wrong region's topic) must be ignored with a warning.
    keep_all = {f: "keep" for f in ("mail_from", "rcpt_to", "sender_ip", "subject", "helo")}
    for rec in (
        policy_record("home", 7, keep_all),
        policy_record("acme", 2, {**keep_all, "mail_from": "mask", "rcpt_to": "mask",
                                  "sender_ip": "truncate_ip", "subject": "length_only"}),
    ):  # fmt: skip
        PolicyLog(s).publish([rec])
    acme, home = acme_event(), home_event()
    produce(s.kafka_bootstrap, s.raw_topic, [encode_event(acme), encode_event(home)], partition=0)

    with run_stage("mailmeta.streams", s, "Worker]: Ready") as stage:
        [redacted] = consume(s.kafka_bootstrap, s.redacted_topic, 1, timeout=45)
        [dead] = consume(s.kafka_bootstrap, s.deadletter_topic, 1, timeout=20)
        url = f"http://{s.api_host}:{s.streams_metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            metrics = r.read().decode()
    output = stage.output

    out = decode_event(redacted.value())
    assert out.event_id == acme.event_id and out.customer_id == "acme"
    assert out.policy_version == 2 and out.subject == str(len("Delivery schedule"))
    assert out.rcpt_to == ["f***@acme.example"] and out.sender_ip == "198.51.100.0/24"

    body = orjson.loads(dead.value())
    reason = "customer 'home' is served in region 'default', not in 'eu'"
    assert body == {
        "reason": reason,
        "event_id": home.event_id,
        "customer_id": "home",
        "topic": s.raw_topic,
        "partition": 0,
        "offset": 1,
    }
    assert dict(dead.headers() or [])["mailmeta-error"].decode() == reason
    assert dead.key() == home.event_id.encode()

    assert 'mailmeta_redaction_dead_letters_total{reason="region"} 1.0' in metrics
    assert "mailmeta_redaction_events_total 1.0" in metrics
    assert 'mailmeta_redaction_policy_version{customer="acme"} 2.0' in metrics
    assert 'customer="home"' not in metrics  # no policy of it is held here
    assert "ignoring policy record at offset 0: customer 'home' is served in region" in output

    # Read to their ends once the worker has stopped: the eu topics downstream of raw hold
    # the eu event and the dead letter, and nothing of the default customer's metadata.
    redacted_all = read_to_end(s.kafka_bootstrap, s.redacted_topic)
    dead_all = read_to_end(s.kafka_bootstrap, s.deadletter_topic)
    assert [decode_event(m.value()).event_id for m in redacted_all] == [acme.event_id]
    assert len(dead_all) == 1
    for topic in (s.redacted_topic, s.deadletter_topic, s.policies_topic):
        for m in read_to_end(s.kafka_bootstrap, topic):
            for secret in HOME_SECRETS:
                assert secret not in record_bytes(m), (topic, secret)


def readable(log: PolicyLog) -> bool:
    """Whether the policies topic answers (Apache Kafka elects a new topic's leader a moment
    after creating it)."""
    try:
        log.read_all()
    except KafkaException:
        return False
    return True


def test_policies_are_seeded_only_for_the_regions_customers(
    settings: Settings, tmp_path: Path
) -> None:
    config = customers_file(tmp_path)
    s = eu_settings(settings, config)
    log = PolicyLog(s)
    wait_until(lambda: readable(log), timeout=20, what="the new policies topic's leader")
    published = log.seed(load_customers(config, "eu"))
    assert [r.customer_id for r in published] == ["acme"]
    topic = log.read_all()
    assert sorted(topic) == ["acme"]
    assert topic["acme"].version == 1 and topic["acme"].source == "config"
    assert [m.partition() for m in read_to_end(s.kafka_bootstrap, s.policies_topic)] == [
        POLICY_PARTITION
    ]
