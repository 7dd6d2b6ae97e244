"""The Postfix integration's read-only milter (`mailmeta milter`), against a real Postfix
(tests/postfix_helpers.py) and Apache Kafka: what reaches the raw topic, and that Postfix
goes on delivering whatever becomes of the milter."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

from mailmeta.config import Settings
from mailmeta.local.process import free_port
from tests.kafka_helpers import Stage, files_containing, run_stage, wait_until
from tests.postfix_helpers import Postfix, available
from tests.smtp_helpers import (
    NextHop,
    message,
    read_raw,
    write_customers,
)

pytestmark = pytest.mark.skipif(
    not available(), reason="needs root and .tools (tests/tools/fetch.sh)"
)


def test_harness_runs_a_real_postfix_that_relays_to_the_next_hop() -> None:
    with NextHop() as hop, Postfix(relayhost=hop.address) as pf:
        with smtplib.SMTP("127.0.0.1", pf.port) as s:
            s.sendmail("a@example.org", ["bob@demo.example"], b"Subject: hi\r\n\r\nbody\r\n")
        wait_until(lambda: hop.received, 30, "the next hop to receive the message")
        assert "status=sent" in wait_until(lambda: "status=sent" in pf.log_text() and pf.log_text())
        pid = pf.master_pid
        base = pf.base
    assert not Path(f"/proc/{pid}").exists()
    assert not base.exists()


@contextmanager
def milter_process(settings: Settings) -> Iterator[tuple[Stage, int]]:
    port = free_port()
    with run_stage(
        "mailmeta", settings, "listening on inet:", args=["milter", "--port", str(port)]
    ) as stage:
        yield stage, port


def _milter(port: int) -> str:
    return f"{{ inet:127.0.0.1:{port}, connect_timeout=5s, default_action=accept }}"


def test_a_message_through_postfix_becomes_one_event_with_the_schema_fields_only(
    settings: Settings,
) -> None:
    canary_body, canary_header = f"BODY-{uuid.uuid4().hex}", f"HDR-{uuid.uuid4().hex}"
    mid = f"<{uuid.uuid4().hex}@sender.example>"
    msg = message(
        "Quarterly =?utf-8?q?r=C3=A9sum=C3=A9?=",
        body=f"secret {canary_body}\r\n",
        extra=f"X-Secret: {canary_header}\r\n",
        message_id=mid,
    )
    with (
        milter_process(settings) as (stage, port),
        NextHop() as hop,
        Postfix(relayhost=hop.address, milter=_milter(port)) as pf,
    ):
        with smtplib.SMTP("127.0.0.1", pf.port, local_hostname="client.test") as s:
            s.sendmail("sender@example.org", ["alice@demo.example", "bob@elsewhere.example"], msg)
        [raw] = wait_until(lambda: read_raw(settings, min_count=1), 30, "the milter's event")
        wait_until(lambda: hop.received, 30, "delivery at the next hop")
        queue_id = re.search(r"(\w+): client=", pf.log_text()).group(1)  # type: ignore[union-attr]
        assert canary_body.encode() in hop.received[0][2]  # the body went on untouched
        output = stage.output
    event = orjson.loads(raw)
    assert event.pop("event_id")
    assert event.pop("received_at")
    assert event.pop("processing_ms") >= 0
    assert event == {
        "customer_id": "demo",
        "status": "accepted",
        "sender_ip": "127.0.0.1",
        "helo": "client.test",
        "mail_from": "sender@example.org",
        "rcpt_to": ["alice@demo.example"],  # not the recipient of no customer
        "message_id": mid,
        "subject": "Quarterly résumé",
        "date": "2025-07-01T08:00:00.000Z",
        "size_bytes": len(msg),  # smtplib declares SIZE=
        "smtp_reply": f"250 2.0.0 Ok: queued as {queue_id}",
        "tls_version": None,
        "policy_version": None,
    }
    for canary in (canary_body, canary_header):
        assert canary not in output
        assert canary.encode() not in raw
        assert files_containing(settings.data_dir, canary.encode()) == []


def test_two_customers_in_one_transaction_get_one_event_each(
    settings: Settings, tmp_path: Path
) -> None:
    customers = write_customers(
        tmp_path / "customers.yaml",
        [
            {"id": "acme", "domains": ["acme.example"], "retention_days": 30},
            {"id": "globex", "domains": ["globex.example"], "retention_days": 7},
        ],
    )
    settings = settings.model_copy(update={"config": customers})
    with (
        milter_process(settings) as (_, port),
        NextHop() as hop,
        Postfix(relayhost=hop.address, milter=_milter(port)) as pf,
    ):
        with smtplib.SMTP("127.0.0.1", pf.port) as s:
            s.sendmail(
                "s@example.org",
                ["a1@acme.example", "g@globex.example", "a2@acme.example"],
                message("two"),
            )
        raws = wait_until(lambda: read_raw(settings, min_count=2), 30, "two events")
    events = sorted((orjson.loads(r) for r in raws), key=lambda e: e["customer_id"])
    assert [(e["customer_id"], e["rcpt_to"]) for e in events] == [
        ("acme", ["a1@acme.example", "a2@acme.example"]),
        ("globex", ["g@globex.example"]),
    ]
    assert len({e["event_id"] for e in events}) == 2
    assert events[0]["smtp_reply"] == events[1]["smtp_reply"]  # one Postfix queue id


def test_postfix_keeps_delivering_when_the_milter_is_killed_under_load(
    settings: Settings,
) -> None:
    total, senders = 400, 4
    failures: list[BaseException] = []
    sent: list[int] = []
    with (
        milter_process(settings) as (stage, port),
        NextHop() as hop,
        Postfix(relayhost=hop.address, milter=_milter(port)) as pf,
    ):

        def send(n: int) -> None:
            try:
                for i in range(n):
                    with smtplib.SMTP("127.0.0.1", pf.port) as s:
                        s.sendmail("s@example.org", ["r@demo.example"], message(f"load {i}"))
                    sent.append(i)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=send, args=(total // senders,)) for _ in range(senders)]
        for t in threads:
            t.start()
        wait_until(lambda: read_raw(settings, min_count=1, timeout=1), 60, "the milter's events")
        os.kill(stage.proc.pid, signal.SIGKILL)
        killed_at = len(sent)
        for t in threads:
            t.join(180)
        assert not failures, failures
        wait_until(lambda: len(hop.received) >= total, 120, f"{total} deliveries at the next hop")
        assert stage.proc.wait(5) == -signal.SIGKILL
    assert killed_at < total  # mid-stream
    assert len(hop.received) == total
    recorded = len(read_raw(settings, timeout=5))
    assert 0 < recorded < total  # the milter was attached, and then it was not


def test_broker_away_postfix_is_answered_in_time_and_the_event_is_spooled_then_replayed(
    settings: Settings,
) -> None:
    away = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{free_port()}"})
    with (
        NextHop() as hop,
        milter_process(away) as (_, port),
        Postfix(relayhost=hop.address, milter=_milter(port)) as pf,
    ):
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", pf.port) as s:
            s.sendmail("s@example.org", ["spooled@demo.example"], message("while away"))
        answered = time.monotonic() - started
        wait_until(lambda: hop.received, 30, "delivery while the broker is away")
        spool = away.data_dir / "spool" / "milter"
        wait_until(lambda: list(spool.glob("seg-*.log")), 30, "the spooled event")
    assert answered < 10  # the spool after MAILMETA_INGEST_SPOOL_AFTER_S (2 s), not a timeout
    assert read_raw(settings, timeout=2) == []
    # The broker back (the same data dir): the spooled event is replayed.
    with milter_process(settings):
        [raw] = wait_until(lambda: read_raw(settings, min_count=1), 30, "the replayed event")
    assert orjson.loads(raw)["rcpt_to"] == ["spooled@demo.example"]


def test_without_a_spool_the_answer_comes_within_its_bound(settings: Settings) -> None:
    away = settings.model_copy(
        update={
            "kafka_bootstrap": f"127.0.0.1:{free_port()}",
            "ingest_spool_max_bytes": 0,
        }
    )
    port = free_port()
    args = ["milter", "--port", str(port), "--answer-within", "1"]
    with (
        NextHop() as hop,
        run_stage("mailmeta", away, "listening on inet:", args=args),
        Postfix(relayhost=hop.address, milter=_milter(port)) as pf,
    ):
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", pf.port) as s:
            s.sendmail("s@example.org", ["r@demo.example"], message("no spool"))
        answered = time.monotonic() - started
        wait_until(lambda: hop.received, 30, "delivery")
    assert 1 <= answered < 5


def test_bytes_that_are_no_milter_protocol_close_that_connection_only(
    settings: Settings,
) -> None:
    with milter_process(settings) as (stage, port):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as bad:
            bad.sendall(b"\xff\xff\xff\xffGET / HTTP/1.1\r\n\r\n")
            assert bad.recv(100) == b""  # closed, nothing answered
        # The milter still serves Postfix.
        with NextHop() as hop, Postfix(relayhost=hop.address, milter=_milter(port)) as pf:
            with smtplib.SMTP("127.0.0.1", pf.port) as s:
                s.sendmail("s@example.org", ["r@demo.example"], message("after"))
            wait_until(lambda: read_raw(settings, min_count=1), 30, "the event")
        assert "HTTP/1.1" not in stage.output


def test_the_tls_version_of_the_client_session_is_captured(
    settings: Settings, tmp_path: Path
) -> None:
    from mailmeta.ingest._tls import self_signed

    cert, key = self_signed(tmp_path / "tls", "postfix.test")
    tls = {
        "smtpd_tls_security_level": "may",
        "smtpd_tls_cert_file": str(cert),
        "smtpd_tls_key_file": str(key),
    }
    with (
        milter_process(settings) as (_, port),
        NextHop() as hop,
        Postfix(relayhost=hop.address, milter=_milter(port), extra=tls) as pf,
    ):
        with smtplib.SMTP("127.0.0.1", pf.port) as s:
            s.starttls(context=ssl._create_unverified_context())
            s.sendmail("s@example.org", ["t@demo.example"], message("over TLS"))
        [raw] = wait_until(lambda: read_raw(settings, min_count=1), 30, "the event")
    assert orjson.loads(raw)["tls_version"] == "TLSv1.3"
