"""Live redaction policies: the API (real broker, real ClickHouse), preview, retroactive
apply, audit, and a change reaching two faust workers of one group within 5 s."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from mailmeta.cli import app as cli_app
from mailmeta.config import Policy, Settings, load_customers
from mailmeta.kafka import ensure_topics
from mailmeta.policy import PolicyLog, PolicyRecord, Redactor
from mailmeta.schema import Event, decode_event, encode_event, new_event_id, now_ms
from mailmeta.service import SinkService
from tests.kafka_helpers import consume, produce, run_stage

pytestmark = pytest.mark.slow

CONFIG = """\
customers:
  - id: demo
    domains: [demo.example]
    retention_days: 60
    hmac_keys:
      - {id: k1, key: "demo-key-one-0123456789"}
      - {id: k2, key: "demo-key-two-0123456789"}
    hmac_active_key: k1
    policy:
      subject: keep
      message_id: keep
      mail_from: keep
      rcpt_to: mask
      sender_ip: truncate_ip
      helo: keep
  - id: other
    domains: [other.example]
    retention_days: 30
"""


def _raw(**kw: object) -> Event:
    base: dict[str, object] = dict(
        event_id=new_event_id(),
        received_at=now_ms(),
        customer_id="demo",
        status="accepted",
        sender_ip="2001:db8:1234:5678::1",
        helo="mx.sender.example",
        mail_from="alice@sender.example",
        rcpt_to=["jane@demo.example"],
        message_id=f"<{uuid.uuid4().hex}@sender.example>",
        subject="Invoice 123456 for you",
    )
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


@pytest.fixture
def psettings(settings: Settings, tmp_path: Path) -> Settings:
    """The test's settings with its own customers file and policies topic."""
    cfg = tmp_path / "customers.yaml"
    cfg.write_text(CONFIG)
    s = settings.model_copy(
        update={"config": cfg, "policies_topic": f"{settings.raw_topic}.policies"}
    )
    ensure_topics(s, load_customers(cfg).shortest_retention_days)
    return s


@pytest.fixture
def sink(psettings: Settings) -> Iterator[SinkService]:
    service = SinkService(
        psettings, load_customers(psettings.config), group_id=f"{psettings.raw_topic}-sink"
    ).start()
    try:
        yield service
    finally:
        assert service.stop(), "sink did not stop cleanly in time"


def auth(sink: SinkService) -> dict[str, str]:
    """The operator token the sink wrote on start (settings.operator_token_file)."""
    assert sink.settings.operator_token_file is not None
    return {"Authorization": f"Bearer {sink.settings.operator_token_file.read_text().strip()}"}


def _put(
    sink: SinkService, customer: str, policy: dict[str, object], **kw: object
) -> httpx.Response:
    return httpx.put(
        f"{sink.url}/v1/policies/{customer}",
        json={"policy": policy, **kw},
        timeout=60,
        headers=auth(sink),
    )


def _stored(sink: SinkService, n: int = 100) -> list[dict[str, object]]:
    assert sink.store is not None
    return sink.store.query_messages("demo", limit=n)  # type: ignore[no-any-return]


def test_seed_set_invalid_audit_and_version(sink: SinkService, psettings: Settings) -> None:
    got = httpx.get(f"{sink.url}/v1/policies", timeout=30, headers=auth(sink))
    assert got.status_code == 200, got.text
    r = got.json()["policies"]
    assert {(p["customer_id"], p["version"], p["source"]) for p in r} == {
        ("demo", 1, "config"),
        ("other", 1, "config"),
    }
    # The config seeded the topic.
    topic = PolicyLog(psettings).read_all()
    assert topic["demo"].version == 1 and topic["demo"].policy.action_for("rcpt_to") == "mask"

    # Invalid policies: 422 naming field and reason; the policy in force stays.
    bad = {
        "subject": ("scramble", "subject"),
        "size_bytes": ("hmac", "size_bytes"),
    }
    for field, (action, where) in bad.items():
        res = _put(sink, "demo", {field: action})
        assert res.status_code == 422, res.text
        assert any(where in p["field"] for p in res.json()["problems"]), res.json()
    res = _put(sink, "demo", {"sender_ip": {"action": "truncate_ip", "ipv4_prefix": 40}})
    assert res.status_code == 422
    assert res.json()["problems"][0]["field"] == "sender_ip.ipv4_prefix"
    res = _put(sink, "other", {"mail_from": "hmac"})  # 'other' has no key
    assert res.status_code == 422 and res.json()["problems"][0]["field"] == "mail_from"
    res = _put(sink, "demo", {"mail_from": "hmac", "hmac_key_id": "k9"})
    assert res.status_code == 422 and res.json()["problems"][0]["field"] == "hmac_key_id"
    assert _put(sink, "nobody", {"subject": "keep"}).status_code == 404
    assert PolicyLog(psettings).read_all()["demo"].version == 1

    res = _put(sink, "demo", {"subject": "length_only", "mail_from": "hmac"})
    assert res.status_code == 200, res.text
    assert res.json()["version"] == 2
    assert res.json()["diff"]["subject"] == {"old": "keep", "new": "length_only"}
    assert PolicyLog(psettings).read_all()["demo"].version == 2
    assert _put(sink, "demo", {"subject": "drop"}, expected_version=1).status_code == 409

    show = httpx.get(f"{sink.url}/v1/policies/demo", timeout=30, headers=auth(sink)).json()
    assert show["version"] == 2 and show["policy"] == {
        "mail_from": "hmac",
        "subject": "length_only",
    }
    audit = httpx.get(f"{sink.url}/v1/policies/demo/audit", timeout=30, headers=auth(sink)).json()[
        "audit"
    ]
    changes = [a for a in audit if a["action"] == "policy.set"]
    assert len(changes) == 1
    a = changes[0]
    assert a["actor"] and a["at"] and a["details"]["old_version"] == 1
    assert a["details"]["new_version"] == 2
    assert a["details"]["diff"]["rcpt_to"] == {"old": "mask", "new": "drop"}
    assert any(x["action"] == "policy.seed" for x in audit)


def test_preview_changes_nothing_and_apply_to_stored_leaves_no_weaker_form(
    sink: SinkService, psettings: Settings
) -> None:
    customers = load_customers(psettings.config)
    raw = [_raw(mail_from=f"user{i}@sender.example", sender_ip=f"198.51.100.{i}") for i in range(5)]
    v1 = [Redactor(customers).redact(e) for e in raw]
    assert sink.store is not None
    sink.store.insert_events(v1)
    before = sorted(_stored(sink), key=lambda r: str(r["event_id"]))
    assert all(r["policy_version"] == 1 for r in before)

    proposed = {
        "mail_from": "hmac",  # keep -> hmac: exact, computed from the stored original
        "helo": "domain_only",  # not allowed for helo: refused below
    }
    res = httpx.post(
        f"{sink.url}/v1/policies/demo/preview",
        json={"policy": proposed},
        timeout=30,
        headers=auth(sink),
    )
    assert res.status_code == 422 and res.json()["problems"][0]["field"] == "helo"
    proposed = {
        "mail_from": "hmac",
        "rcpt_to": "drop",  # mask -> drop
        "sender_ip": {"action": "truncate_ip", "ipv4_prefix": 16},  # narrowed
        "subject": {"action": "keep", "replace": [{"pattern": r"\d{6}", "with": "#"}]},
        "message_id": "domain_only",
    }
    res = httpx.post(
        f"{sink.url}/v1/policies/demo/preview",
        json={"policy": proposed, "sample": 3},
        timeout=30,
        headers=auth(sink),
    )
    assert res.status_code == 200, res.text
    body = res.json()
    assert len(body["rows"]) == 3 and "already redacted" in body["note"]
    f = body["rows"][0]["fields"]
    assert f["mail_from"]["change"] == "apply" and f["mail_from"]["after"].startswith("k1:")
    assert f["rcpt_to"]["after"] is None and f["rcpt_to"]["before"] == ["j***@demo.example"]
    assert f["helo"]["change"] == "drop"
    assert f["subject"]["after"] == "Invoice # for you"
    # Preview changed nothing: stored rows and the version in force are as before.
    assert sorted(_stored(sink), key=lambda r: str(r["event_id"])) == before
    assert PolicyLog(psettings).read_all()["demo"].version == 1

    res = _put(sink, "demo", proposed, apply_to_stored=True)
    assert res.status_code == 200, res.text
    assert res.json()["applied_to_stored"]["rows_rewritten"] == 5
    key1 = b"demo-key-one-0123456789"
    rows = _stored(sink)
    assert len(rows) == 5
    originals = {e.event_id: e for e in raw}
    for row in rows:
        ev = originals[str(row["event_id"])]
        assert row["policy_version"] == 2
        assert (
            row["mail_from"]
            == "k1:" + hmac.new(key1, str(ev.mail_from).encode(), hashlib.sha256).hexdigest()
        )
        assert row["rcpt_to"] is None and row["helo"] is None
        assert row["sender_ip"] == "198.51.0.0/16"
        assert row["message_id"] == "sender.example"
        assert row["subject"] == "Invoice # for you"
    # No physical row (any version, merged or not) keeps a weaker form.
    dump = sink.store._rows(  # type: ignore[attr-defined]
        "SELECT mail_from, rcpt_to, sender_ip, helo, subject FROM messages "
        "WHERE customer_id = 'demo'"
    )
    flat = repr(dump)
    assert "@sender.example" not in flat and "j***" not in flat and "123456" not in flat
    assert "198.51.100." not in flat and "mx.sender" not in flat

    # Loosening never un-redacts: back to keep leaves stored rows as they are.
    res = _put(sink, "demo", {"mail_from": "keep", "subject": "keep"}, apply_to_stored=True)
    assert res.status_code == 200
    assert res.json()["applied_to_stored"]["rows_rewritten"] == 5  # only drops happen
    for row in _stored(sink):
        assert str(row["mail_from"]).startswith("k1:") and row["subject"] == "Invoice # for you"
        assert row["sender_ip"] is None  # new policy drops it: stricter
    audit = httpx.get(f"{sink.url}/v1/policies/demo/audit", timeout=30, headers=auth(sink)).json()[
        "audit"
    ]
    assert [a["action"] for a in audit].count("policy.apply_to_stored") == 2


def test_cli_policy_commands(sink: SinkService, tmp_path: Path) -> None:
    runner = CliRunner()
    token = auth(sink)["Authorization"].removeprefix("Bearer ")
    api = ["--api", sink.url, "--token", token]
    good = tmp_path / "p.yaml"
    good.write_text(yaml.safe_dump({"subject": "drop", "mail_from": "domain_only"}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("subject: keep\nrcpt_to: {action: mask, keep_chars: 99}\n")

    res = runner.invoke(cli_app, ["policy", "validate", str(bad)])
    assert res.exit_code == 2 and "field 'rcpt_to.keep_chars'" in res.output
    res = runner.invoke(cli_app, ["policy", "set", "demo", str(bad), *api])
    assert res.exit_code == 2 and "nothing changed" in res.output
    res = runner.invoke(cli_app, ["policy", "validate", str(good)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli_app, ["policy", "preview", "demo", str(good), "--sample", "5", *api])
    assert res.exit_code == 0, res.output and "already redacted" in res.output
    res = runner.invoke(cli_app, ["policy", "set", "demo", str(good), *api])
    assert res.exit_code == 0, res.output
    assert "v1 -> v2" in res.output and "subject: keep -> drop" in res.output
    res = runner.invoke(cli_app, ["policy", "list", *api])
    assert re.search(r"demo\s+2\s+api", res.output), res.output
    res = runner.invoke(cli_app, ["policy", "show", "demo", *api])
    assert "mail_from: domain_only" in res.output and "version 2" in res.output
    res = runner.invoke(cli_app, ["policy", "audit", "demo", *api])
    assert "policy.set" in res.output


def test_live_change_reaches_two_workers_within_5s(psettings: Settings) -> None:
    s = psettings.model_copy(update={"partitions": 2})
    log = PolicyLog(s)
    customers = load_customers(s.config)
    log.seed(customers)
    with (
        run_stage("mailmeta.streams", s, "redacting") as w1,
        run_stage("mailmeta.streams", s, "redacting") as w2,
    ):
        produce(s.kafka_bootstrap, s.raw_topic, [encode_event(_raw()) for _ in range(20)])
        first = consume(s.kafka_bootstrap, s.redacted_topic, 20, timeout=45)
        assert len(first) == 20 and {decode_event(m.value()).policy_version for m in first} == {1}

        t0 = time.monotonic()
        log.publish([PolicyRecord("demo", 2, Policy.model_validate({"subject": "length_only"}))])
        seen: dict[int, float] = {}
        while time.monotonic() < t0 + 5 and len(seen) < 2:
            for i, w in enumerate((w1, w2)):
                if i not in seen and "policy v2 of demo in force" in w.output:
                    seen[i] = time.monotonic() - t0
            time.sleep(0.05)
        assert len(seen) == 2, f"seen by {seen} within 5 s:\n{w1.output[-2000:]}"
        # No restart: the same processes redact new events with v2.
        assert w1.proc.poll() is None and w2.proc.poll() is None
        later = [_raw() for _ in range(20)]
        produce(s.kafka_bootstrap, s.raw_topic, [encode_event(e) for e in later])
        out = consume(s.kafka_bootstrap, s.redacted_topic, 40, timeout=30)
        ids = {e.event_id for e in later}
        new = [e for e in map(decode_event, (m.value() for m in out)) if e.event_id in ids]
        assert len(new) == 20 and {e.policy_version for e in new} == {2}
        assert {(e.subject, e.mail_from, e.rcpt_to) for e in new} == {("22", None, None)}


def test_version_stamped_on_stored_rows(sink: SinkService, psettings: Settings) -> None:
    """The worker stamps the version in force; the sink stores it on the row."""
    res = _put(sink, "demo", {"subject": "keep", "mail_from": "hmac", "hmac_key_id": "k2"})
    assert res.status_code == 200 and res.json()["version"] == 2
    ev = _raw()
    produce(psettings.kafka_bootstrap, psettings.raw_topic, [encode_event(ev)])
    with run_stage("mailmeta.streams", psettings, "redacting"):
        deadline = time.monotonic() + 45
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline and not rows:
            rows = _stored(sink)
            time.sleep(0.3)
    assert len(rows) == 1
    row = rows[0]
    assert row["policy_version"] == 2
    # Key rotation: the hash names the key that made it, and verifies under it.
    k2 = b"demo-key-two-0123456789"
    assert row["mail_from"] == "k2:" + hmac.new(k2, b"alice@sender.example", "sha256").hexdigest()
    assert row["rcpt_to"] is None and row["subject"] == ev.subject


@pytest.mark.parametrize("broker", ["kafka"], indirect=True)
def test_issue_21_sequence_refuses_the_override_and_the_stricter_policy_applies(
    sink: SinkService, psettings: Settings
) -> None:
    """Issue 21.1 as reported: a rules entry overriding its actions entry was accepted as v3
    and unreadable to workers; the stricter policy after it was published as v2 again and
    every new mail stored its subject in clear."""
    keep = {"subject": "keep", "rcpt_to": "keep", "message_id": "keep"}
    res = _put(sink, "demo", keep)
    assert res.status_code == 200 and res.json()["version"] == 2
    override = {
        "actions": {**keep, "size_bytes": "keep"},
        "rules": {"size_bytes": {"action": "hmac"}},
    }
    res = _put(sink, "demo", override)
    assert res.status_code == 422, res.text
    assert [p["field"] for p in res.json()["problems"]] == ["size_bytes"]
    res = _put(sink, "demo", {"rcpt_to": "keep", "message_id": "keep"})
    assert res.status_code == 200 and res.json()["version"] == 3, res.text
    shown = httpx.get(f"{sink.url}/v1/policies/demo", headers=auth(sink), timeout=30).json()
    assert shown["version"] == 3 and "subject" not in shown["policy"] and not shown["problems"]
    ev = _raw()
    produce(psettings.kafka_bootstrap, psettings.raw_topic, [encode_event(ev)])
    with run_stage("mailmeta.streams", psettings, "redacting"):
        deadline = time.monotonic() + 45
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline and not rows:
            rows = _stored(sink)
            time.sleep(0.3)
    assert len(rows) == 1
    assert rows[0]["policy_version"] == 3 and rows[0]["subject"] is None
    assert rows[0]["rcpt_to"] == ev.rcpt_to
