"""The SMTP front end against a real broker, with real SMTP conversations."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import selectors
import signal
import smtplib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mailmeta.config import Customers, Settings, load_customers
from mailmeta.ingest import IngestServer, decode_rfc2047, extract_headers
from mailmeta.kafka import ensure_topics
from mailmeta.local.apache_kafka import KafkaNode
from mailmeta.local.brokers import LocalBroker
from mailmeta.local.process import free_port
from tests.kafka_helpers import wait_until
from tests.smtp_helpers import (
    SWAKS,
    ServerThread,
    Wire,
    listening,
    message,
    read_events,
    read_raw,
    running_server,
    write_customers,
)

RCPT = "alice@demo.example"


@pytest.fixture
def customers(settings: Settings) -> Customers:
    return load_customers(settings.config)


def _send_ok(port: int, rcpts: list[str], msg: bytes, sender: str = "bob@example.org") -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.ehlo("relay.example.org")
        client.mail(sender)
        for r in rcpts:
            code, text = client.rcpt(r)
            assert code == 250, (r, code, text)
        code, text = client.data(msg)
        assert code == 250, (code, text)
        return text.decode()


def test_smtplib_message_becomes_one_event(settings: Settings, customers: Customers) -> None:
    subject = base64.b64encode("Grüße aus Köln ✓".encode()).decode()
    msg = message(f"=?utf-8?B?{subject}?=", message_id="  <id-1@test.example>  ")
    with running_server(settings, customers) as srv, smtplib.SMTP("127.0.0.1", srv.port) as c:
        code, ehlo = c.ehlo("relay.example.org")
        assert code == 250
        assert b"SIZE 33554432" in ehlo  # the data size limit is set and advertised
        refused = c.sendmail("bob@example.org", [RCPT, "carol@demo.example"], msg)
        assert refused == {}

    [event] = read_events(settings, min_count=1)
    assert event["customer_id"] == "demo"
    assert event["status"] == "accepted"
    assert event["subject"] == "Grüße aus Köln ✓"
    assert event["message_id"] == "<id-1@test.example>"
    assert event["date"] == "2025-07-01T08:00:00.000Z"
    assert event["rcpt_to"] == [RCPT, "carol@demo.example"]
    assert event["mail_from"] == "bob@example.org"
    assert event["helo"] == "relay.example.org"
    assert event["sender_ip"] == "127.0.0.1"
    assert event["size_bytes"] == len(msg)  # the DATA content, CRLFs included
    assert event["smtp_reply"] == f"250 2.0.0 Ok: queued as {event['event_id']}"
    assert event["tls_version"] is None
    assert isinstance(event["processing_ms"], float) and event["processing_ms"] >= 0
    assert event["policy_version"] is None


@pytest.mark.skipif(not SWAKS.exists(), reason="swaks not fetched (tests/tools/fetch.sh)")
def test_swaks_message_becomes_event(settings: Settings, customers: Customers) -> None:
    with running_server(settings, customers) as srv:
        args = ["--server", f"127.0.0.1:{srv.port}", "--helo", "swaks.example", "--from", "<>"]
        args += ["--to", RCPT, "--header", "Subject: via swaks", "--body", "swaks body"]
        out = subprocess.run(
            ["perl", str(SWAKS), *args, "--timeout", "15"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 Ok: queued as" in out.stdout
    [event] = read_events(settings, min_count=1)
    assert event["subject"] == "via swaks"
    assert event["helo"] == "swaks.example"
    assert event["mail_from"] == ""  # the null sender
    assert event["rcpt_to"] == [RCPT]
    assert event["message_id"]  # swaks writes one
    assert event["event_id"] in out.stdout


def test_unknown_domain_and_malformed_address_rejected(
    settings: Settings, customers: Customers
) -> None:
    with running_server(settings, customers) as srv:
        with Wire(srv.port) as w:
            assert w.cmd("EHLO relay.example.org")[0] == 250
            assert w.cmd("MAIL FROM:<bob@example.org>")[0] == 250
            # A foreign domain from a client that may not relay: never an open relay.
            code, text = w.cmd("RCPT TO:<eve@elsewhere.example>")
            assert code == 550
            assert text == "5.1.1 <eve@elsewhere.example>: recipient domain not served here"
            code, text = w.cmd("RCPT TO:<no-domain>")
            assert code == 553 and "malformed" in text
            code, text = w.cmd("RCPT TO:<a b@@demo.example")
            assert code in (501, 553), text
            assert w.cmd("DATA")[0] == 503  # no accepted recipient: nothing to deliver
        # A valid message afterwards: the only event on the topic must be this one.
        _send_ok(srv.port, [RCPT], message("sentinel"))
    events = read_events(settings, min_count=1)
    assert [e["subject"] for e in events] == ["sentinel"]


def test_recipients_of_several_customers_split_per_customer(
    settings: Settings, tmp_path: Path
) -> None:
    path = write_customers(
        tmp_path / "customers.yaml",
        [
            {"id": "acme", "domains": ["acme.example"], "retention_days": 30},
            {"id": "globex", "domains": ["globex.example", "gx.example"], "retention_days": 7},
        ],
    )
    customers = load_customers(path)
    rcpts = ["a1@acme.example", "g1@globex.example", "a2@ACME.example", "g2@gx.example"]
    with running_server(settings, customers) as srv:
        reply = _send_ok(srv.port, rcpts, message("shared"))
    events = read_events(settings, min_count=2)
    by_customer = {e["customer_id"]: e for e in events}
    assert len(events) == 2 and set(by_customer) == {"acme", "globex"}
    assert by_customer["acme"]["rcpt_to"] == ["a1@acme.example", "a2@ACME.example"]
    assert by_customer["globex"]["rcpt_to"] == ["g1@globex.example", "g2@gx.example"]
    for e in events:
        assert e["subject"] == "shared"
        assert e["event_id"] in reply
        # A customer's event names no other customer's id.
        assert e["smtp_reply"] == f"250 2.0.0 Ok: queued as {e['event_id']}"
    assert by_customer["acme"]["event_id"] != by_customer["globex"]["event_id"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"Subject: lf\nX-A: b\r\n\r\nbody\r\n", id="bare-lf-in-headers"),
        pytest.param(b"Subject: cr\r\n\r\nbody\rmore\r\n", id="bare-cr-in-body"),
        # The smuggling shape: a bare-LF "end of data" followed by a second transaction.
        pytest.param(
            b"Subject: smuggle\r\n\r\nbody\n.\nMAIL FROM:<x@evil.example>\n"
            b"RCPT TO:<alice@demo.example>\nDATA\nSubject: smuggled\n\nhi\r\n",
            id="smuggling",
        ),
    ],
)
def test_bare_newline_rejected(settings: Settings, customers: Customers, body: bytes) -> None:
    with running_server(settings, customers) as srv:
        with Wire(srv.port) as w:
            w.cmd("EHLO relay.example.org")
            assert w.cmd("MAIL FROM:<bob@example.org>")[0] == 250
            assert w.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
            assert w.cmd("DATA")[0] == 354
            code, text = w.send(body + b".\r\n")
            assert code == 550 and "bare" in text, (code, text)
            # One reply only (nothing smuggled was executed), and the session goes on.
            assert w.cmd("NOOP")[0] == 250
        _send_ok(srv.port, [RCPT], message("sentinel"))
    assert [e["subject"] for e in read_events(settings, min_count=1)] == ["sentinel"]


def test_broken_headers_still_give_an_event(settings: Settings, customers: Customers) -> None:
    broken = (
        b"Subject: =?utf-8?B?!!!not-base64?= =?x-no-such-charset?Q?caf=E9?= =?utf-8?Q?ok?=\r\n"
        b"Message-ID:\r\n   <folded@test.example>\r\n"
        b"Date: the day after tomorrow\r\n"
        b"X-Raw: \xff\xfe\x00 8-bit garbage\r\n"
        b'From: "unterminated <a@b\r\n'
        b"this line is not a header\r\n"
        b"Subject: a second subject after the garbage\r\n"
        b"\r\nbody\r\n"
    )
    garbage_first = b": no name\r\n\x01\x02\r\nSubject: never parsed\r\n\r\nbody\r\n"
    eight_bit = "Subject: Grüße, raw UTF-8\r\n\r\nbody\r\n".encode()
    with running_server(settings, customers) as srv:
        for msg in (broken, garbage_first, eight_bit):
            _send_ok(srv.port, [RCPT], msg)
    events = read_events(settings, min_count=3)
    assert len(events) == 3
    by_size = {e["size_bytes"]: e for e in events}
    first = by_size[len(broken)]
    assert first["subject"] is not None and first["subject"].endswith("caféok")
    assert first["message_id"] == "<folded@test.example>"
    assert first["date"] is None
    second = by_size[len(garbage_first)]
    assert second["subject"] is None and second["message_id"] is None
    assert by_size[len(eight_bit)]["subject"] == "Grüße, raw UTF-8"


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("=?utf-8?B?SGVsbG8=?= world", "Hello world"),
        ("=?utf-8?B?SGVs?=  =?utf-8?B?bG8=?=", "Hello"),  # space between words dropped
        ("=?ISO-8859-1*en?Q?caf=E9_au_lait?=", "café au lait"),
        ("=?x-unknown?Q?caf=E9?=", "café"),  # unknown charset: UTF-8, else Latin-1
        ("=?utf-8?Q?caf=C3?= ok", "caf\ufffd ok"),  # truncated UTF-8: what decodes stays
        ("plain", "plain"),
    ],
)
def test_decode_rfc2047(raw: str, decoded: str) -> None:
    assert decode_rfc2047(raw) == decoded


def test_extract_reads_only_the_header_block() -> None:
    fields = extract_headers(b"Subject: head\r\n\r\nSubject: body\r\nDate: 1 Jan 2020\r\n")
    assert fields.subject == "head" and fields.date is None
    assert extract_headers(b"\r\nSubject: body\r\n").subject is None


@pytest.mark.parametrize("later", ["kafka", "tansu"])
def test_broker_unreachable_gives_451_and_client_can_retry(
    later: str, settings: Settings, customers: Customers, tmp_path: Path
) -> None:
    kafka_port = free_port()
    down = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{kafka_port}"})
    msg = message("retried")
    # Without the durable spool (tests/test_ingest_spool.py covers it) a broker outage is 451.
    with running_server(down, customers, delivery_timeout=2.0, spool_enabled=False) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
            client.ehlo("relay.example.org")
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail("bob@example.org", [RCPT], msg)
            assert info.value.smtp_code == 451
            assert info.value.smtp_error == b"4.3.0 Temporary failure, try again later"

            # The broker comes (back) up; the client retries on the same connection.
            started = (
                KafkaNode(tmp_path / "kafka", port=kafka_port)
                if later == "kafka"
                else LocalBroker("tansu", kafka_port)
            )
            with started as broker:
                up = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
                ensure_topics(up, customers.shortest_retention_days)
                codes = []
                for _ in range(5):
                    try:
                        client.sendmail("bob@example.org", [RCPT], msg)
                        codes.append(250)
                        break
                    except smtplib.SMTPDataError as exc:
                        codes.append(exc.smtp_code)
                assert codes[-1] == 250 and set(codes) <= {250, 451}, codes
                events = read_events(up, min_count=1)
        assert events and all(e["subject"] == "retried" for e in events)


def test_canary_never_leaves_the_process(
    settings: Settings, customers: Customers, caplog: pytest.LogCaptureFixture
) -> None:
    canary = f"CANARY-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)  # the most the logs could ever say
    msg = message(
        "canary test",
        extra=f"X-Secret: {canary}\r\n",
        body=f"line one\r\nthe secret is {canary}\r\n",
    )
    with running_server(settings, customers) as srv:
        _send_ok(srv.port, [RCPT], msg)
        with Wire(srv.port) as w:  # and through a rejected (bare LF) message
            w.cmd("EHLO relay.example.org")
            w.cmd("MAIL FROM:<bob@example.org>")
            w.cmd(f"RCPT TO:<{RCPT}>")
            w.cmd("DATA")
            assert w.send(f"X-Secret: {canary}\n\n{canary}\r\n.\r\n".encode())[0] == 550
    raw = read_raw(settings, min_count=1)
    assert len(raw) == 1
    assert b"canary test" in raw[0]
    assert canary.encode() not in raw[0]
    assert caplog.records  # the server did log
    assert canary not in caplog.text
    assert all(canary not in r.getMessage() for r in caplog.records)


def test_graceful_stop_finishes_open_transaction(settings: Settings, customers: Customers) -> None:
    st = ServerThread(settings, customers)
    srv = st.start()
    try:
        with Wire(srv.port) as busy, Wire(srv.port) as idle:
            busy.cmd("EHLO relay.example.org")
            idle.cmd("EHLO idle.example.org")
            assert busy.cmd("MAIL FROM:<bob@example.org>")[0] == 250
            assert busy.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
            port = srv.port  # read before the stop: a closed listener has none
            stopping = st.stop_async(grace=5.0)
            wait_until(lambda: not listening(port), 5, "the listener to close")
            with pytest.raises(ConnectionRefusedError):
                Wire(port, timeout=2)  # no longer accepting
            assert idle.reply()[0] == 421  # idle sessions are told and closed
            assert busy.cmd("DATA")[0] == 354
            code, text = busy.send(message("in flight") + b".\r\n")
            assert code == 250, text
            assert busy.reply()[0] == 421 and busy.closed_by_server()
            stopping.result(10)
    finally:
        st.close()
    assert [e["subject"] for e in read_events(settings, min_count=1)] == ["in flight"]


@pytest.mark.asyncio
async def test_async_api_in_the_test_loop(settings: Settings, customers: Customers) -> None:
    async with IngestServer(settings, customers, port=0) as srv:
        assert srv.port != 0
        reply = await asyncio.to_thread(_send_ok, srv.port, [RCPT], message("async"))
    events = await asyncio.to_thread(read_events, settings, min_count=1)
    assert [e["event_id"] for e in events] == [reply.split()[-1]]


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("no line from the ingest process")
    return proc.stdout.readline()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_process_entrypoint(settings: Settings, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MAILMETA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "MAILMETA_RAW_TOPIC": settings.raw_topic,
        "MAILMETA_SMTP_HOST": "127.0.0.1",
        "MAILMETA_SMTP_PORT": str(settings.smtp_port),
        "MAILMETA_CONFIG": str(settings.config),
    }
    cmd = [sys.executable, "-m", "mailmeta.ingest"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(proc, 20)
        assert line == f"mailmeta ingest: SMTP listening on 127.0.0.1:{settings.smtp_port}\n"
        _send_ok(settings.smtp_port, [RCPT], message("from the process"))
        before = _cpu_seconds(proc.pid)
        time.sleep(2.0)  # the measurement window, not a synchronisation: idle is ~0 CPU
        assert _cpu_seconds(proc.pid) - before < 0.1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert out == ""  # exactly the one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert [e["subject"] for e in read_events(settings, min_count=1)] == ["from the process"]

    bad = tmp_path / "bad.yaml"
    bad.write_text("customers: []\n")
    res = subprocess.run(
        cmd, env={**env, "MAILMETA_CONFIG": str(bad)}, capture_output=True, text=True, timeout=20
    )
    assert res.returncode == 2
    assert res.stdout == "" and str(bad) in res.stderr
