"""The production front end: relay mode, access control, AUTH, STARTTLS and hardened input,
with real SMTP clients, a real next hop and a real broker."""

from __future__ import annotations

import signal
import smtplib
import ssl
import time
from email.parser import BytesHeaderParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mailmeta.config import Customers, Settings, load_customers
from mailmeta.ingest import hash_password
from mailmeta.ingest._extract import _FOLD, header_block, scan_headers
from mailmeta.ingest._protocol import _FAST_ADDR
from mailmeta.local.process import free_port
from tests.kafka_helpers import wait_until
from tests.smtp_helpers import NextHop, Wire, message, read_events, running_server, write_customers

RCPT = "alice@demo.example"
PASSWORD = "correct horse battery staple"


def _customers(tmp_path: Path, **demo: Any) -> Customers:
    return load_customers(
        write_customers(
            tmp_path / "customers.yaml",
            [
                {"id": "demo", "domains": ["demo.example"], "retention_days": 30, **demo},
                {
                    "id": "outbound",
                    "domains": ["out.example"],
                    "retention_days": 30,
                    "client_networks": ["192.0.2.0/24"],
                    "smtp_users": [
                        {"username": "relayuser", "password_hash": hash_password(PASSWORD)}
                    ],
                },
            ],
        )
    )


def _with(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update=update)


def _session(w: Wire, rcpts: list[str], sender: str = "bob@example.org") -> list[int]:
    assert w.cmd("EHLO client.example.org")[0] == 250
    assert w.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    return [w.cmd(f"RCPT TO:<{r}>")[0] for r in rcpts]


def _sentinel(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as c:
        assert c.sendmail("bob@example.org", [RCPT], message("sentinel")) == {}


def _only_sentinel(settings: Settings) -> None:
    assert [e["subject"] for e in read_events(settings, min_count=1)] == ["sentinel"]


# --- relay mode ---------------------------------------------------------------------------


def test_relay_delivered_forwards_unchanged(settings: Settings, tmp_path: Path) -> None:
    body = "line\r\n.leading dot\r\n..two dots\r\nGrüße 8-bit\r\n"
    msg = message("relayed", body=body)
    with NextHop() as hop:
        s = _with(settings, relay_to=hop.address)
        with running_server(s, _customers(tmp_path)) as srv:
            with smtplib.SMTP("127.0.0.1", srv.port, timeout=15) as c:
                c.ehlo("client.example.org")
                c.mail("bob@example.org")
                assert c.rcpt(RCPT)[0] == 250
                code, text = c.data(msg)
    assert (code, text) == (250, b"2.0.0 Ok: queued as NEXTHOP1")
    [(mail_from, rcpts, content)] = hop.received
    assert (mail_from, rcpts) == ("bob@example.org", [RCPT])
    assert content == msg  # byte for byte, dot-stuffing undone by the next hop
    [event] = read_events(settings, min_count=1)
    assert event["status"] == "delivered"
    assert event["smtp_reply"] == "250 2.0.0 Ok: queued as NEXTHOP1"
    assert event["subject"] == "relayed"


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        ("451 4.3.0 next hop busy", "deferred"),
        ("554 5.7.1 rejected by policy", "bounced"),
    ],
)
def test_relay_passes_refusal_back(
    settings: Settings, tmp_path: Path, reply: str, status: str
) -> None:
    with NextHop(reply) as hop:
        s = _with(settings, relay_to=hop.address)
        with running_server(s, _customers(tmp_path)) as srv, Wire(srv.port) as w:
            assert _session(w, [RCPT]) == [250]
            assert w.cmd("DATA")[0] == 354
            code, text = w.send(message("refused") + b".\r\n")
    assert f"{code} {text}" == reply
    [event] = read_events(settings, min_count=1)
    assert (event["status"], event["smtp_reply"]) == (status, reply)


def test_relay_recipient_refused_upstream_and_hop_down(settings: Settings, tmp_path: Path) -> None:
    with NextHop() as hop:
        hop.rcpt_reply = "550 5.1.1 no such user"
        s = _with(settings, relay_to=hop.address)
        with running_server(s, _customers(tmp_path)) as srv, Wire(srv.port) as w:
            _session(w, [RCPT])
            w.cmd("DATA")
            assert w.send(message("no user") + b".\r\n") == (550, "5.1.1 no such user")
    dead = f"127.0.0.1:{free_port()}"
    with running_server(_with(settings, relay_to=dead), _customers(tmp_path)) as srv:
        with Wire(srv.port) as w:
            _session(w, [RCPT])
            w.cmd("DATA")
            code, text = w.send(message("hop down") + b".\r\n")
    assert code == 451 and "unreachable" in text
    events = {e["subject"]: e for e in read_events(settings, min_count=2)}
    assert events["no user"]["status"] == "bounced"
    assert events["hop down"]["status"] == "deferred"
    assert events["hop down"]["smtp_reply"] == f"451 {text}"


# Subjects whose words name a Python codec that is no mail charset: decoded by it, each gave
# a lone surrogate, an event that could not be encoded, and a 451 after the hop had the mail.
ODD_SUBJECTS = {
    "=?utf-7?q?a+2AA-b?=": "a+2AA-b",
    "=?unicode_escape?q?a\\ud800b?=": "a\\ud800b",
    "=?utf-16?b?YQAA2GIA?= tail": "a\ufffdb tail",  # a mail charset: a lone surrogate replaced
}


def _deliver_like_an_mta(port: int, content: bytes, attempts: int = 3) -> list[int]:
    """Send ``content`` as an MTA would: again after a 4xx, up to ``attempts`` times. The
    reply codes in order."""
    codes = []
    for _ in range(attempts):
        with Wire(port) as w:
            assert _session(w, [RCPT]) == [250]
            assert w.cmd("DATA")[0] == 354
            code, _ = w.send(content + b".\r\n")
        codes.append(code)
        if code // 100 != 4:
            break
    return codes


def test_relay_delivers_once_whatever_the_subject(settings: Settings, tmp_path: Path) -> None:
    with NextHop() as hop:
        s = _with(settings, relay_to=hop.address)
        with running_server(s, _customers(tmp_path)) as srv:
            for n, subject in enumerate(ODD_SUBJECTS):
                msg = message(subject, message_id=f"<odd-{n}@test.example>")
                assert _deliver_like_an_mta(srv.port, msg) == [250], subject
        # Exactly one copy of each at the next hop, and exactly one event of each.
        assert sorted(content for _, _, content in hop.received) == sorted(
            message(subject, message_id=f"<odd-{n}@test.example>")
            for n, subject in enumerate(ODD_SUBJECTS)
        )
    events = read_events(settings, min_count=len(ODD_SUBJECTS))
    assert sorted((e["message_id"], e["subject"], e["status"]) for e in events) == sorted(
        (f"<odd-{n}@test.example>", decoded, "delivered")
        for n, decoded in enumerate(ODD_SUBJECTS.values())
    )


def test_relay_verdict_stands_when_the_event_is_lost(settings: Settings, tmp_path: Path) -> None:
    # Once the next hop has the mail, its verdict is the client's even when the event can be
    # neither produced nor spooled: a 4xx would make the client deliver a second copy.
    down = _with(settings, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    with NextHop() as hop:
        s = _with(down, relay_to=hop.address)
        lost = REGISTRY.get_sample_value("mailmeta_ingest_metadata_lost_total") or 0.0
        with running_server(
            s, _customers(tmp_path), delivery_timeout=1.0, spool_enabled=False
        ) as srv:
            assert _deliver_like_an_mta(srv.port, message("broker down")) == [250]
        assert len(hop.received) == 1
    assert REGISTRY.get_sample_value("mailmeta_ingest_metadata_lost_total") == lost + 1


def test_per_customer_next_hop(settings: Settings, tmp_path: Path) -> None:
    with NextHop() as hop:
        customers = _customers(tmp_path, relay_to=hop.address)
        s = _with(settings, relay_networks="127.0.0.0/8")
        with running_server(s, customers) as srv, Wire(srv.port) as w:
            # demo relays to the hop, mail for "outbound" is a terminal sink: not in one go.
            codes = _session(w, [RCPT, "x@out.example"], sender="x@out.example")
            assert codes == [250, 452]
            w.cmd("DATA")
            assert w.send(message("to hop") + b".\r\n")[0] == 250
    assert len(hop.received) == 1


# --- who may relay ------------------------------------------------------------------------


def test_not_an_open_relay(settings: Settings, tmp_path: Path) -> None:
    customers = _customers(tmp_path)
    with running_server(settings, customers) as srv, Wire(srv.port) as w:
        # Inbound to a customer's domain: from anyone. Foreign: refused.
        assert _session(w, [RCPT, "eve@elsewhere.example"]) == [250, 550]
        assert w.cmd("RSET")[0] == 250
    # Client in the relay networks, sender domain owned by a customer: relayed for it.
    with NextHop() as hop:
        s = _with(settings, relay_networks="127.0.0.0/8", relay_to=hop.address)
        with running_server(s, customers) as srv, Wire(srv.port) as w:
            assert _session(w, ["x@elsewhere.example"], sender="me@out.example") == [250]
            w.cmd("DATA")
            assert w.send(message("outbound") + b".\r\n")[0] == 250
            # ... but not for a sender domain nobody here owns.
            assert _session(w, ["x@elsewhere.example"], sender="me@nobody.example") == [550]
    events = [e for e in read_events(settings, min_count=1) if e["subject"] == "outbound"]
    assert [(e["customer_id"], e["rcpt_to"]) for e in events] == [
        ("outbound", ["x@elsewhere.example"])
    ]
    assert hop.received[0][1] == ["x@elsewhere.example"]


def _tls_client(port: int) -> smtplib.SMTP:
    c = smtplib.SMTP("127.0.0.1", port, timeout=15)
    c.ehlo("client.example.org")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the self-signed certificate of --tls-self-signed
    c.starttls(context=ctx)
    c.ehlo("client.example.org")
    return c


def test_starttls_records_tls_version_and_auth(settings: Settings, tmp_path: Path) -> None:
    s = _with(settings, tls_self_signed=True)
    with running_server(s, _customers(tmp_path)) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=15) as c:
            _, ehlo = c.ehlo("client.example.org")
            assert b"STARTTLS" in ehlo and b"AUTH" not in ehlo  # no password in clear text
            assert c.docmd("AUTH", "PLAIN AGZvbwBiYXI=")[0] == 538
        with _tls_client(srv.port) as c:
            assert "auth" in c.esmtp_features and "PLAIN" in c.esmtp_features["auth"]
            with pytest.raises(smtplib.SMTPAuthenticationError) as info:
                c.login("relayuser", "wrong password")
            assert info.value.smtp_code == 535
            with pytest.raises(smtplib.SMTPRecipientsRefused):  # unauthenticated: no relay
                c.sendmail("bob@example.org", ["x@elsewhere.example"], message("denied"))
        with _tls_client(srv.port) as c:
            c.user, c.password = "relayuser", PASSWORD
            assert c.auth("LOGIN", c.auth_login, initial_response_ok=False)[0] == 235
            assert c.sendmail("me@sender.example", ["x@elsewhere.example"], message("auth")) == {}
        with _tls_client(srv.port) as c:
            c.login("relayuser", PASSWORD)  # PLAIN
            assert c.sendmail("bob@example.org", [RCPT], message("tls inbound")) == {}
    events = {e["subject"]: e for e in read_events(settings, min_count=2)}
    assert set(events) == {"auth", "tls inbound"}
    assert events["auth"]["customer_id"] == "outbound"  # the AUTH user's customer
    assert events["auth"]["status"] == "accepted"  # no relay_to: a terminal sink
    for e in events.values():
        assert e["tls_version"] in ("TLSv1.2", "TLSv1.3")


def test_customer_requiring_tls(settings: Settings, tmp_path: Path) -> None:
    s = _with(settings, tls_self_signed=True)
    with running_server(s, _customers(tmp_path, require_tls=True)) as srv:
        with Wire(srv.port) as w:
            w.cmd("EHLO client.example.org")
            w.cmd("MAIL FROM:<bob@example.org>")
            assert w.cmd(f"RCPT TO:<{RCPT}>") == (530, "5.7.0 Must issue a STARTTLS command first")
        with _tls_client(srv.port) as c:
            assert c.sendmail("bob@example.org", [RCPT], message("sentinel")) == {}
    _only_sentinel(settings)


# --- hardened input -----------------------------------------------------------------------


def test_long_lines_and_commands_refused(settings: Settings, tmp_path: Path) -> None:
    with running_server(settings, _customers(tmp_path)) as srv:
        with Wire(srv.port) as w:
            _session(w, [RCPT])
            assert w.cmd("DATA")[0] == 354
            long_line = b"Subject: x\r\n\r\n" + b"a" * 1001 + b"\r\n.\r\n"
            code, text = w.send(long_line)
            assert code == 500 and "too long" in text.lower()
            assert w.cmd("NOOP")[0] == 250
            code, text = w.cmd("NOOP " + "x" * 520)
            assert code == 500 and "too long" in text.lower()
            code, _ = w.cmd(f"MAIL FROM:<{'a' * 600}@example.org>")
            assert code == 500
        _sentinel(srv.port)
    _only_sentinel(settings)


def test_size_limit_advertised_and_enforced(settings: Settings, tmp_path: Path) -> None:
    s = _with(settings, smtp_max_message_size=4096)
    with running_server(s, _customers(tmp_path)) as srv:
        with Wire(srv.port) as w:
            _, ehlo = w.cmd("EHLO client.example.org")
            assert "SIZE 4096" in ehlo
            assert w.cmd("MAIL FROM:<bob@example.org> SIZE=5000")[0] == 552
            assert w.cmd("MAIL FROM:<bob@example.org> SIZE=100")[0] == 250  # client lies
            assert w.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
            assert w.cmd("DATA")[0] == 354
            code, text = w.send(message("big", body="x" * 70 + "\r\n") * 60 + b".\r\n")
            assert code == 552 and "too much" in text.lower()
        _sentinel(srv.port)
    _only_sentinel(settings)


def test_recipient_limit(settings: Settings, tmp_path: Path) -> None:
    s = _with(settings, smtp_max_recipients=100, smtp_max_errors=50)
    with running_server(s, _customers(tmp_path)) as srv, Wire(srv.port) as w:
        codes = _session(w, [f"r{i}@demo.example" for i in range(101)])
        assert codes == [250] * 100 + [452]
        w.cmd("DATA")
        assert w.send(message("hundred") + b".\r\n")[0] == 250
    [event] = read_events(settings, min_count=1)
    assert len(event["rcpt_to"]) == 100


def test_idle_client_times_out(settings: Settings, tmp_path: Path) -> None:
    s = _with(settings, smtp_timeout=1.0)
    with running_server(s, _customers(tmp_path)) as srv, Wire(srv.port) as w:
        assert w.cmd("EHLO client.example.org")[0] == 250
        t0 = time.monotonic()
        code, text = w.reply()
        assert code == 421 and "timeout" in text
        assert w.closed_by_server()
        assert 0.8 < time.monotonic() - t0 < 5


def test_too_many_errors_drop_the_connection(settings: Settings, tmp_path: Path) -> None:
    s = _with(settings, smtp_max_errors=5)
    with running_server(s, _customers(tmp_path)) as srv:
        with Wire(srv.port) as w:
            w.cmd("EHLO client.example.org")
            w.cmd("MAIL FROM:<bob@example.org>")
            codes = [w.cmd(f"RCPT TO:<x{i}@elsewhere.example>")[0] for i in range(4)]
            assert codes == [550] * 4
            assert w.cmd("BOGUS")[0] == 500
            assert w.reply() == (421, "4.7.0 Too many errors, closing connection")
            assert w.closed_by_server()
        _sentinel(srv.port)
    _only_sentinel(settings)


def test_too_many_connections_from_one_ip(settings: Settings, tmp_path: Path) -> None:
    s = _with(settings, smtp_max_connections_per_ip=3)
    with running_server(s, _customers(tmp_path)) as srv:
        held = [Wire(srv.port) for _ in range(3)]
        try:
            assert all(w.greeting[0] == 220 for w in held)
            extra = Wire(srv.port)
            assert extra.greeting[0] == 421 and "Too many connections" in extra.greeting[1]
            assert extra.closed_by_server()
            extra.close()
        finally:
            for w in held:
                w.close()
        # Every slot is free again once the server has seen the closes.
        wait_until(lambda: not srv.shared.per_ip, 5, "the server to see the closes")
        _sentinel(srv.port)
    _only_sentinel(settings)


# --- the fast paths give aiosmtpd's results -----------------------------------------------


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b.example>",
        "<a.b+c@sub.b-c.example> SIZE=100 BODY=8BITMIME",
        "<>",
        '<"quoted local"@b.example>',
        "<@route,@x:a@b.example>",
        "<a@[192.0.2.1]>",
        "a@b.example",
        "<a@b.example>SIZE=1",
        "<a..b@b.example>",
        "<a@-b.example>",
        "<.a@b.example>",
        "<a@b.example",
        "<a(comment)@b.example>",
        "<ü@b.example>",
    ],
)
def test_fast_address_parse_agrees_with_aiosmtpd(arg: str) -> None:
    from aiosmtpd.smtp import SMTP

    aiosmtpd_says = SMTP._getaddr(SimpleNamespace(local_part_limit=0), arg)  # type: ignore[arg-type]
    m = _FAST_ADDR.match(arg)
    # The common forms take the fast path; everything else is left to aiosmtpd's parser.
    assert (m is not None) == (arg in _FAST_FORMS)
    if m is not None:  # where the fast path answers, it answers like aiosmtpd's parser
        assert (m.group(1), (m.group(2) or "")) == aiosmtpd_says


_FAST_FORMS = {"<a@b.example>", "<a.b+c@sub.b-c.example> SIZE=100 BODY=8BITMIME"}


_ODD_HEADERS = [
    b"Subject: plain\r\n\r\nbody",
    b"From x Mon\r\nSubject:  folded\r\n  twice\r\n\tand tab \r\n\r\n",
    b" leading continuation\r\nSubject: s\r\n",
    b": empty name\r\nSubject: after\r\n",
    b"X: 1\r\nFrom y\r\n cont\r\nSubject: q\r\n",
    b"SUBJECT : space before colon\r\nSubject: y\r\n",
    b"subject: lower\r\nSubject: second\r\nMessage-Id: <m@x>\r\nDATE: 1 Jan 2020\r\n",
    b"Subject: \xff\xfe raw 8-bit \xc3\xa4\r\n",
    b"Subject:\r\n",
    b"Message-ID:\r\n   <folded@test.example>\r\n",
    b"X-\x80: bad name\r\nSubject: never\r\n",
    b"no colon line\r\nSubject: never\r\n",
]


@pytest.mark.parametrize("block", _ODD_HEADERS)
def test_header_scan_agrees_with_email_parser(block: bytes) -> None:
    msg = BytesHeaderParser().parsebytes(header_block(block), headersonly=True)
    ref: dict[str, str] = {}
    for name, value in msg.raw_items():
        key = name.strip().lower()
        if key in ("message-id", "subject", "date") and key not in ref:
            text = str(value).encode("ascii", "surrogateescape").decode("utf-8", "replace")
            ref[key] = _FOLD.sub("", text)
    assert scan_headers(header_block(block)) == ref


# --- the process: --workers, metrics, a real relay chain --------------------------------

TOOLS = Path(__file__).resolve().parent.parent / ".tools" / "usr"


@pytest.mark.slow
@pytest.mark.skipif(not (TOOLS / "sbin" / "smtp-sink").exists(), reason="tests/tools/fetch.sh")
def test_workers_relay_to_postfix_smtp_sink(settings: Settings, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import urllib.request

    tool_env = {**os.environ, "LD_LIBRARY_PATH": str(TOOLS / "lib" / "postfix")}
    # Worker i serves metrics on metrics_port + i: both ports must be free.
    sink_port, metrics_port = free_port(), free_port(1)
    sink_cmd = [str(TOOLS / "sbin" / "smtp-sink")]
    if os.geteuid() == 0:
        sink_cmd += ["-u", "nobody"]
    sink = subprocess.Popen([*sink_cmd, f"127.0.0.1:{sink_port}", "50"], env=tool_env)
    env = {
        **os.environ,
        "MAILMETA_CONFIG": str(settings.config),
        "MAILMETA_DATA_DIR": str(tmp_path / "data"),
        "MAILMETA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "MAILMETA_RAW_TOPIC": settings.raw_topic,
        "MAILMETA_SMTP_PORT": str(settings.smtp_port),
        "MAILMETA_LOG_LEVEL": "warning",
    }
    cmd = [sys.executable, "-m", "mailmeta.ingest", "--workers", "2"]
    cmd += ["--relay-to", f"127.0.0.1:{sink_port}", "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == f"mailmeta ingest: SMTP listening on 127.0.0.1:{settings.smtp_port}\n"
        src = [str(TOOLS / "sbin" / "smtp-source"), "-s", "10", "-m", "60", "-l", "1024"]
        src += ["-f", "sender@example.org", "-t", RCPT, f"127.0.0.1:{settings.smtp_port}"]
        res = subprocess.run(src, env=tool_env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and not res.stderr, res.stderr
        per_worker = []
        for i in range(2):
            url = f"http://127.0.0.1:{metrics_port + i}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read().decode()
            per_worker.append(
                sum(
                    float(ln.split()[-1])
                    for ln in text.splitlines()
                    if ln.startswith('mailmeta_ingest_messages_total{outcome="relayed_delivered"}')
                )
            )
        assert sum(per_worker) == 60 and all(n > 0 for n in per_worker)  # both took a share
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        sink.terminate()
        sink.wait(5)
    events = read_events(settings, min_count=60, timeout=20)
    assert len(events) == 60 and len({e["event_id"] for e in events}) == 60
    assert {e["status"] for e in events} == {"delivered"}
    assert all(e["smtp_reply"].startswith("250 ") for e in events)
