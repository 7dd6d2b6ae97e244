"""The whole pipeline from `mailmeta up`: real SMTP clients, a real broker, real ClickHouse."""

from __future__ import annotations

import hashlib
import hmac
import os
import smtplib
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from mailmeta.config import load_customers
from mailmeta.local.brokers import LocalBroker
from tests.conftest import EXAMPLE_CONFIG
from tests.kafka_helpers import files_containing, read_to_end
from tests.up_helpers import (
    MAILMETA,
    SMTP_SOURCE,
    SWAKS,
    TOOLS,
    broker_bootstrap,
    dump_clickhouse,
    mailmeta_up,
    need_tools,
    send_smtplib,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.parametrize("broker", ["kafka", "tansu"])
def test_pipeline_end_to_end(broker: str, tmp_path: Path) -> None:
    """`mailmeta up` on its default broker (Apache Kafka) and on the memory-only Tansu."""
    need_tools()
    data = tmp_path / "mm"
    canary = f"CANARY-{uuid.uuid4().hex}"
    key = load_customers(EXAMPLE_CONFIG).by_id["demo"].key_bytes()
    with mailmeta_up(data, "--broker", broker) as up:
        assert "SMTP 127.0.0.1:" in up.output and "API http://127.0.0.1:" in up.output
        msg_id = send_smtplib(up.smtp_port, canary)
        # A real client: swaks.
        swaks = subprocess.run(
            [str(SWAKS), "--server", f"127.0.0.1:{up.smtp_port}", "--helo", "swaks.sender.example",
             "--from", "bob@sender.example", "--to", "team@demo.example",
             "--header", "Subject: from swaks", "--header", f"X-Secret: {canary}",
             "--body", f"swaks body {canary}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert swaks.returncode == 0, swaks.stdout + swaks.stderr
        # Another real client: Postfix's smtp-source, one message per connection.
        src = subprocess.run(
            [str(SMTP_SOURCE), "-s", "1", "-m", "3", "-l", "512", "-f", "load@sender.example",
             "-t", "sink@demo.example", f"127.0.0.1:{up.smtp_port}"],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, LD_LIBRARY_PATH=str(TOOLS / "usr" / "lib" / "postfix")),
        )  # fmt: skip
        assert src.returncode == 0, src.stdout + src.stderr

        rows = up.wait_messages(5)
        # The API requires a token; `mailmeta up` wrote the operator's, readable by us only.
        assert httpx.get(f"{up.api}/v1/messages", params={"customer": "demo"}).status_code == 401
        assert (data / "operator-token").stat().st_mode & 0o777 == 0o600
        token = (data / "operator-token").read_text().strip()
        mine = up.messages(message_id=msg_id)
        assert len(mine) == 1
        row = mine[0]
        # Every action of the demo policy is visible.
        assert (
            row["mail_from"]
            == "k1:" + hmac.new(key, b"alice@sender.example", hashlib.sha256).hexdigest()
        )
        assert row["rcpt_to"] == ["j***@demo.example"]
        assert row["sender_ip"] == "127.0.0.0/24"
        assert row["helo"] is None
        assert row["subject"] == "Grüße aus Köln"
        assert row["message_id"] == msg_id
        assert row["date"] == "2026-11-22T09:00:00.000Z"
        assert row["status"] == "accepted" and row["policy_version"] == 1
        assert row["customer_id"] == "demo"
        by_sender = {r["mail_from"]: r for r in rows}
        bob = "k1:" + hmac.new(key, b"bob@sender.example", hashlib.sha256).hexdigest()
        assert by_sender[bob]["subject"] == "from swaks"
        assert by_sender[bob]["rcpt_to"] == ["t***@demo.example"]
        assert sum(1 for r in rows if r["rcpt_to"] == ["s***@demo.example"]) == 3
        # Newest first.
        times = [r["received_at"] for r in rows]
        assert times == sorted(times, reverse=True)

        # Recipient at an unknown domain: a 5xx with a reason, and no event.
        with smtplib.SMTP("127.0.0.1", up.smtp_port, timeout=30) as s:
            s.ehlo("mx.sender.example")
            s.mail("alice@sender.example")
            code, text = s.rcpt("someone@not-a-customer.example")
            assert 500 <= code < 600 and text
        # Canary: in no Kafka topic, read to its end (5 mails: an event each, no dead letter).
        seen = {}
        for topic in ("mailmeta.raw", "mailmeta.redacted", "mailmeta.deadletter"):
            records = read_to_end(broker_bootstrap(up), topic)
            seen[topic] = len(records)
            assert all(canary.encode() not in (m.value() or b"") for m in records)
        assert seen == {"mailmeta.raw": 5, "mailmeta.redacted": 5, "mailmeta.deadletter": 0}
        stop_seconds = up.stop()
    assert stop_seconds < 15, f"shutdown took {stop_seconds:.1f}s"
    assert up.proc.returncode == 0, up.output[-3000:]
    # Canary: in no log line, no file under the data dir, no ClickHouse table.
    assert canary not in up.output
    assert token not in up.output  # the clear token is in its file only
    assert files_containing(data, token.encode()) == [data / "operator-token"]
    assert files_containing(data, canary.encode()) == []
    dump = dump_clickhouse(data)
    assert msg_id.encode() in dump  # the dump does see the stored rows…
    assert canary.encode() not in dump  # …and the canary is in none of them.

    # A second `mailmeta up` on the same data dir still shows the earlier rows.
    with mailmeta_up(data, "--broker", broker) as up2:
        assert len(up2.messages(message_id=msg_id)) == 1
        assert len(up2.messages()) == 5


def test_shutdown_drains_every_accepted_message(tmp_path: Path) -> None:
    """Tansu is memory-only: a message answered 250 survives only if shutdown drains it."""
    data = tmp_path / "mm"
    accepted = []
    with mailmeta_up(data, "--broker", "tansu") as up:
        for i in range(40):
            accepted.append(send_smtplib(up.smtp_port, f"c{i}", subject=f"drain {i}"))
        # Stop at once: most of these are still in the broker or the worker.
        up.stop()
        assert up.proc.returncode == 0, up.output[-3000:]
        assert "drained" in up.output
    with mailmeta_up(data, "--broker", "tansu") as up2:
        stored = {r["message_id"] for r in up2.messages(limit="1000")}
    assert set(accepted) <= stored


@pytest.mark.noida
def test_pipeline_on_noida(noida: LocalBroker, tmp_path: Path) -> None:
    """Nothing depends on one broker's quirks: the same pipeline on noida-db."""
    with mailmeta_up(tmp_path / "mm", "--kafka-bootstrap", noida.bootstrap) as up:
        msg_id = send_smtplib(up.smtp_port, "noida")
        row = up.wait_messages(1, message_id=msg_id)[0]
        assert row["rcpt_to"] == ["j***@demo.example"] and row["helo"] is None
        assert up.stop() < 15
        assert up.proc.returncode == 0


def test_bad_config_fails_at_start_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "customers.yaml"
    bad.write_text(
        "customers:\n"
        "  - id: acme\n    domains: [acme.example]\n    retention_days: 30\n"
        "    policy: {subject: scramble}\n"
        "  - id: other\n    domains: [acme.example]\n    retention_days: 30\n"
    )
    res = subprocess.run(
        [*MAILMETA, "up", "--config", str(bad), "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert f"{bad}: customer 'acme': field 'policy.subject'" in res.stderr
    assert not (tmp_path / "d" / "logs" / "broker.log").exists()  # nothing was started
    cases = {
        "customers:\n  - id: x\n    retention_days: 30\n": "customer 'x': field 'domains': Field required",
        "customers:\n  - {id: a, domains: [d.example], retention_days: 30}\n"
        "  - {id: b, domains: [D.example], retention_days: 30}\n":
            "domain 'd.example' belongs to both customer 'a' and 'b'",
    }  # fmt: skip
    for text, message in cases.items():
        bad.write_text(text)
        res = subprocess.run(
            [*MAILMETA, "config", "validate", str(bad)], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 2
        assert message in res.stderr and str(bad) in res.stderr
