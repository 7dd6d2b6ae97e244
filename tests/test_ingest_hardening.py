"""Hardening of the SMTP front end, each on a real SMTP conversation with the real server:
command injection, STARTTLS, odd charsets, reply codes, privacy of logs and replies, AUTH
cost, PROXY protocol."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mailmeta import schema
from mailmeta.config import Customers, Settings, load_customers
from mailmeta.ingest import IngestServer, hash_password
from mailmeta.ingest._handler import encode_event
from mailmeta.ingest._protocol import PROXY_TIMEOUT
from mailmeta.ingest._relay import relay
from mailmeta.local.process import free_port
from tests.kafka_helpers import wait_until
from tests.smtp_helpers import NextHop, Wire, message, read_events, running_server, write_customers

RCPT = "alice@demo.example"


def _customers(tmp_path: Path, **demo: Any) -> Customers:
    return load_customers(
        write_customers(
            tmp_path / "customers.yaml",
            [{"id": "demo", "domains": ["demo.example"], "retention_days": 30, **demo}],
        )
    )


def _with(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update=update)


# --- item 14.3: no command injection through relay mode ----------------------------------


def test_control_characters_in_commands_refused(settings: Settings, tmp_path: Path) -> None:
    injected = b'MAIL FROM:<"x\rRCPT TO:<victim@evil.example>\r"@sender.example>\r\n'
    with NextHop() as hop:
        s = _with(settings, relay_to=hop.address)
        with running_server(s, _customers(tmp_path)) as srv, Wire(srv.port) as w:
            assert w.send(b"EHLO client\x00.example\r\n")[0] == 501
            assert w.cmd("EHLO client.example.org")[0] == 250
            code, _ = w.send(injected)
            assert code == 553
            assert w.send(b"MAIL FROM:<bob@example.org\x00>\r\n")[0] == 553
            assert w.send(b"MAIL FROM:<bob@example.org> SIZE=10\x0bX\r\n")[0] == 501
            assert w.cmd("MAIL FROM:<bob@example.org>")[0] == 250
            assert w.send(b"RCPT TO:<alice\r@demo.example>\r\n")[0] == 553
            assert w.send(b"RCPT TO:<alice@demo.example\x7f>\r\n")[0] == 553
            assert w.send(b"NOOP a\x01b\r\n")[0] == 501
            assert w.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
            assert w.cmd("DATA")[0] == 354
            assert w.send(message("clean") + b".\r\n")[0] == 250
    [(mail_from, rcpts, _)] = hop.received
    assert (mail_from, rcpts) == ("bob@example.org", [RCPT])
    assert [e["subject"] for e in read_events(settings, min_count=1)] == ["clean"]


def test_relay_refuses_to_send_control_characters() -> None:
    # Defence in depth: whatever got past the front end, the relay sends no line with a
    # control character to the next hop.
    async def attempt(**kw: Any) -> int:
        args: dict[str, Any] = {"helo": "mx.test", "mail_from": "a@b.example"}
        args |= {"rcpt_to": [RCPT], "content": message("x"), **kw}
        return (await relay(hop.address, **args)).code

    with NextHop() as hop:
        assert asyncio.run(attempt(mail_from='"x\rRCPT TO:<v@evil.example>"@b.example')) == 501
        assert asyncio.run(attempt(rcpt_to=["v@evil.example\x00"])) == 501
        assert asyncio.run(attempt(helo="mx\n.test")) == 501
        assert hop.received == []
        assert asyncio.run(attempt()) == 250
    assert len(hop.received) == 1


# --- item 14.4: STARTTLS inside TLS -------------------------------------------------------


def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="mx.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


def _starttls(w: Wire) -> None:
    assert w.cmd("EHLO client.example.org")[0] == 250
    assert w.cmd("STARTTLS")[0] == 220
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the self-signed certificate
    w.sock = ctx.wrap_socket(w.sock)
    assert w.cmd("EHLO client.example.org")[0] == 250


def test_second_starttls_refused_without_log_flood(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    s = _with(settings, tls_self_signed=True)
    with running_server(s, _customers(tmp_path)) as srv, Wire(srv.port) as w:
        _starttls(w)
        _, ehlo = w.cmd("EHLO client.example.org")
        assert "STARTTLS" not in ehlo
        assert w.cmd("STARTTLS") == (503, "5.5.1 Error: TLS already active")
        # A client that goes on with a handshake anyway: its bytes are bad commands.
        w.sock.sendall(_client_hello() + b"\r\n")
        code, _ = w.cmd("NOOP")
        while code != 250:  # one 500 per line of handshake bytes, then the NOOP
            assert code == 500
            code, _ = w.reply()
        assert w.cmd("MAIL FROM:<bob@example.org>")[0] == 250
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# --- item 14.5: odd charset names in the Subject ------------------------------------------

_ODD_CHARSETS = ["rot13", "base64", "hex", "zlib", "uu", "idna", "undefined", "x-unknown"]


def test_odd_charset_costs_only_its_word(settings: Settings, tmp_path: Path) -> None:
    with running_server(settings, _customers(tmp_path)) as srv, Wire(srv.port) as w:
        assert w.cmd("EHLO client.example.org")[0] == 250
        for cs in _ODD_CHARSETS:
            subject = f"=?utf-8?Q?ok?= =?{cs}?Q?x?= tail =?utf-8?B?w6Q=?="
            assert w.cmd("MAIL FROM:<bob@example.org>")[0] == 250
            assert w.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
            assert w.cmd("DATA")[0] == 354
            assert w.send(message(subject, message_id=f"<{cs}@t>") + b".\r\n")[0] == 250
    events = read_events(settings, min_count=len(_ODD_CHARSETS))
    by_charset = {e["message_id"][1:-3]: e["subject"] for e in events}
    # Not a text codec (or one that cannot decode): the word is read as UTF-8 / Latin-1.
    assert by_charset == {cs: "okx tail ä" for cs in _ODD_CHARSETS}


# --- item 14.8: the reply to an unknown recipient domain is the one the README gives -----


def test_unknown_domain_reply_matches_readme(settings: Settings, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    with running_server(settings, _customers(tmp_path)) as srv, Wire(srv.port) as w:
        assert w.cmd("EHLO client.example.org")[0] == 250
        assert w.cmd("MAIL FROM:<bob@example.org>")[0] == 250
        # A client without relay rights: a foreign domain is simply not served here.
        code, text = w.cmd("RCPT TO:<eve@elsewhere.example>")
    assert (code, text) == (550, "5.1.1 <eve@elsewhere.example>: recipient domain not served here")
    assert "`550 5.1.1 … recipient domain not served here`" in readme
    assert "554 5.7.1" not in readme.split("## SMTP front end")[1].split("\n## ")[0]


# --- item 14.13: no personal data in logs, nothing internal in replies -------------------

CLIENT = "127.0.0.2"  # not the server's own address, which its logs may name


def _conversation(port: int, subject: str) -> tuple[int, str]:
    with Wire(port, source=CLIENT) as w:
        assert w.cmd("EHLO client.example.org")[0] == 250
        assert w.cmd("BOGUS")[0] == 500  # aiosmtpd logs this one at WARNING
        assert w.cmd("MAIL FROM:<bob@sender.example>")[0] == 250
        assert w.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
        assert w.cmd("DATA")[0] == 354
        assert w.send(message(subject, body="bare\rCR\r\n") + b".\r\n")[0] == 550
        assert w.cmd("MAIL FROM:<bob@sender.example>")[0] == 250
        assert w.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
        assert w.cmd("DATA")[0] == 354
        return w.send(message(subject) + b".\r\n")


def test_logs_and_replies_keep_private_things_private(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the most the logs could ever say
    customers = _customers(tmp_path)
    with running_server(settings, customers) as srv:
        assert _conversation(srv.port, "private subject one")[0] == 250
    down = _with(settings, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    with running_server(down, customers, delivery_timeout=1.0, spool_enabled=False) as srv:
        # The broker's error text stays inside: a fixed reply.
        reply = _conversation(srv.port, "private subject two")
        assert reply == (451, "4.3.0 Temporary failure, try again later")
    [event] = read_events(settings, min_count=1)
    assert event["sender_ip"] == CLIENT  # the address was there to leak
    messages = [r.getMessage() for r in caplog.records]
    assert any("conn " in m and "BOGUS" in m for m in messages)  # a connection id instead
    assert any("conn " in m and "deferred" in m for m in messages)
    for private in (CLIENT, "bob@sender.example", RCPT, "private subject"):
        assert not [m for m in messages if private in m], private


# --- item 14.15: SMTP AUTH costs are bounded ----------------------------------------------

PASSWORD = "correct horse battery staple"


def _auth_customers(tmp_path: Path) -> Customers:
    user = {"username": "relayuser", "password_hash": hash_password(PASSWORD)}
    return _customers(tmp_path, smtp_users=[user])


def _auth_plain(w: Wire, password: str) -> tuple[int, str]:
    blob = base64.b64encode(f"\0relayuser\0{password}".encode()).decode()
    return w.cmd(f"AUTH PLAIN {blob}")


def test_auth_verifications_bounded_and_failures_limited(
    settings: Settings, tmp_path: Path
) -> None:
    s = _with(settings, tls_self_signed=True)
    with running_server(s, _auth_customers(tmp_path)) as srv:
        auth = srv.shared.authenticator
        assert auth is not None

        ready = threading.Barrier(8, timeout=30)

        def fail_once(i: int) -> int:
            with Wire(srv.port, source=f"127.0.1.{i}") as w:
                _starttls(w)
                ready.wait()  # every AUTH arrives at about the same time
                return _auth_plain(w, "wrong")[0]

        # Many clients at once (one failure each: under the limit): at most 2 argon2
        # verifications run at the same time, the rest wait their turn.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(fail_once, range(1, 9))) == [535] * 8
        assert auth.peak == 2
        # One address that keeps failing is held off before argon2 runs at all, even
        # with the right password; other addresses are not.
        with Wire(srv.port, source="127.0.2.1") as w:
            _starttls(w)
            assert [_auth_plain(w, "wrong")[0] for _ in range(5)] == [535] * 5
            limited = (454, "4.7.0 Too many failed authentications, try again later")
            assert _auth_plain(w, PASSWORD) == limited
        with Wire(srv.port, source="127.0.2.2") as w:
            _starttls(w)
            assert _auth_plain(w, PASSWORD)[0] == 235


# --- issue 17.1: PROXY protocol from the load balancers only -----------------------------

LB = "127.0.0.1"  # the load balancer's address; 127.0.0.2 is any other client
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _v1(src: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    dst = "2001:db8::1" if ":" in src else "192.0.2.1"
    return f"PROXY {family} {src} {dst} {port} 25\r\n".encode()


def _v2(src: str, port: int = 40000) -> bytes:
    addr = ipaddress.ip_address(src)
    dst = ipaddress.ip_address("2001:db8::1" if addr.version == 6 else "192.0.2.1")
    body = addr.packed + dst.packed + struct.pack("!HH", port, 25)
    family = 0x21 if addr.version == 6 else 0x11  # AF_INET6 / AF_INET, STREAM
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def _proxied_mail(port: int, header: bytes, subject: str, rcpt: str = RCPT) -> None:
    with Wire(port, source=LB, preamble=header) as w:
        assert w.greeting[0] == 220
        assert w.cmd("EHLO client.example.org")[0] == 250
        assert w.cmd("MAIL FROM:<me@out.example>")[0] == 250
        assert w.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        assert w.cmd("DATA")[0] == 354
        assert w.send(message(subject) + b".\r\n")[0] == 250


def _talk_until_closed(port: int, source: str, raw: bytes) -> bytes:
    """Send raw bytes, then read what the server says until it closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), 10, source_address=(source, 0)) as s:
        s.sendall(raw)
        got = b""
        while chunk := s.recv(4096):  # a timeout raises: the server must close
            got += chunk
        return got


def _proxy_customers(tmp_path: Path) -> Customers:
    return load_customers(
        write_customers(
            tmp_path / "customers.yaml",
            [
                {"id": "demo", "domains": ["demo.example"], "retention_days": 30},
                {
                    "id": "outbound",
                    "domains": ["out.example"],
                    "retention_days": 30,
                    "client_networks": ["192.0.2.0/24"],
                },
            ],
        )
    )


def test_proxy_protocol_gives_the_original_client(settings: Settings, tmp_path: Path) -> None:
    s = _with(settings, smtp_proxy_networks=f"{LB}/32, 10.0.0.0/8", smtp_max_connections_per_ip=1)
    with running_server(s, _proxy_customers(tmp_path)) as srv:
        _proxied_mail(srv.port, _v1("198.51.100.7"), "v1")
        _proxied_mail(srv.port, _v2("2001:db8::5"), "v2")
        # The original client's network may relay (customer "outbound"), the LB's may not.
        _proxied_mail(srv.port, _v2("192.0.2.9"), "relayed", rcpt="x@elsewhere.example")
        # Connection limits count original clients, not the load balancer.
        with Wire(srv.port, source=LB, preamble=_v1("198.51.100.7")) as held:
            assert held.greeting[0] == 220
            again = _talk_until_closed(srv.port, LB, _v2("198.51.100.7"))
            assert again.startswith(b"421 4.7.0 Too many connections")
            _proxied_mail(srv.port, _v1("198.51.100.8"), "other client")
        # Malformed headers from the load balancer: closed before any greeting.
        bad_v2 = V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12)  # version 3
        for bad in (b"PROXY TCP4 999.0.0.1 192.0.2.1 1 25\r\n", bad_v2):
            assert _talk_until_closed(srv.port, LB, bad + b"EHLO x\r\n") == b""
        # A PROXY header from anyone else: the connection is closed, nothing relayed.
        for header in (_v1("192.0.2.9"), _v2("192.0.2.9")):
            said = _talk_until_closed(srv.port, "127.0.0.2", header + b"EHLO x\r\n")
            assert said.startswith(b"220 ") and b"\r\n250" not in said
        # Without a header, anyone else is served directly, under its own address.
        with Wire(srv.port, source="127.0.0.2") as w:
            assert w.cmd("EHLO client.example.org")[0] == 250
            assert w.cmd("MAIL FROM:<bob@example.org>")[0] == 250
            assert w.cmd(f"RCPT TO:<{RCPT}>")[0] == 250
            assert w.cmd("DATA")[0] == 354
            assert w.send(message("direct") + b".\r\n")[0] == 250
    events = {e["subject"]: e for e in read_events(settings, min_count=5)}
    assert {k: e["sender_ip"] for k, e in events.items()} == {
        "v1": "198.51.100.7",
        "v2": "2001:db8::5",
        "relayed": "192.0.2.9",
        "other client": "198.51.100.8",
        "direct": "127.0.0.2",
    }
    assert events["relayed"]["customer_id"] == "outbound"


def test_proxy_networks_are_checked(settings: Settings) -> None:
    bad = _with(settings, smtp_proxy_networks="10.0.0.0/8, not-a-network")
    with pytest.raises(ValueError, match="MAILMETA_SMTP_PROXY_NETWORKS: 'not-a-network'"):
        IngestServer(bad, load_customers(settings.config))


# --- issue 21.3: the PROXY header wait is bounded and counted ----------------------------


def test_proxy_header_wait_is_bounded_and_counted(settings: Settings, tmp_path: Path) -> None:
    s = _with(settings, smtp_proxy_networks=f"{LB}/32", smtp_max_connections_per_ip=3)
    stalled = [
        b"",  # nothing at all
        b"PROXY TCP4 1.2.3.4",  # a v1 header that never ends
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # a v2 header announcing 65535 more bytes
    ]
    with running_server(s, _proxy_customers(tmp_path)) as srv:
        t0 = time.monotonic()
        socks = []
        for raw in stalled:
            sock = socket.create_connection(("127.0.0.1", srv.port), 5, source_address=(LB, 0))
            sock.sendall(raw)
            socks.append(sock)
        try:
            # Waiting for their headers, they hold the balancer's connection budget.
            refused = _talk_until_closed(srv.port, LB, b"")
            assert refused.startswith(b"421 4.7.0 Too many connections")
            for sock, raw in zip(socks, stalled, strict=True):
                sock.settimeout(PROXY_TIMEOUT + 5)  # the bound of this poll
                said = b""
                while chunk := sock.recv(4096):  # a timeout raises: the server must close
                    said += chunk
                assert b"\r\n250" not in said and not said.startswith(b"220"), raw
                assert time.monotonic() - t0 < PROXY_TIMEOUT + 3, raw
        finally:
            for sock in socks:
                sock.close()
        # Closed, they count no more: the balancer's clients are served again.
        wait_until(lambda: LB not in srv.shared.per_ip, timeout=5, what="connections released")
        _proxied_mail(srv.port, _v1("198.51.100.7"), "after the stalls")
    [event] = read_events(settings, min_count=1)
    assert (event["subject"], event["sender_ip"]) == ("after the stalls", "198.51.100.7")


# --- issue 21.3: no client bytes in the log -----------------------------------------------


def test_unknown_commands_logged_as_a_bounded_escaped_word(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with running_server(settings, _customers(tmp_path)) as srv, Wire(srv.port) as w:
        assert w.cmd("EHLO client.example.org")[0] == 250
        assert w.cmd("MAIL_FROM:<alice@sender.example>")[0] == 500
        assert w.send(b"X\x1b[2J\x1b]0;owned\x07\x00\rRCPT\r\n")[0] == 500
        assert w.send(b"VERY-LONG-COMMAND-WORD-" + b"A" * 200 + b"\r\n")[0] == 500
        assert w.cmd("NOOP")[0] == 250
    warnings = [r.getMessage() for r in caplog.records if "unrecognised" in r.getMessage()]
    assert len(warnings) == 3
    logged = caplog.text + "".join(warnings)
    for private in ("alice", "sender.example"):  # aiosmtpd upper-cases the word
        assert private not in logged.lower(), private
    for raw in ("\x1b", "\x00", "\x07", "\r"):
        assert raw not in logged, repr(raw)
    assert [m.split("unrecognised: ", 1)[1] for m in warnings] == [
        "MAIL_FROM…",
        "X\\x1b[2J\\x1b]0;OWNED\\x07\\x00…",
        "VERY-LONG-COMMAN…",
    ]


def test_an_event_is_encodable_whatever_its_text() -> None:
    # The backstop behind the header decoder: text no encoder takes costs characters, never
    # the event.
    ev = schema.Event(
        event_id=schema.new_event_id(),
        received_at=schema.now_ms(),
        customer_id="demo",
        status="accepted",
        subject="a\ud800b",
        rcpt_to=["x@demo.example", "y\udcffz@demo.example"],
    )
    decoded = schema.decode_event(encode_event(ev))
    assert (decoded.subject, decoded.rcpt_to) == (
        "a\ufffdb",
        ["x@demo.example", "y\ufffdz@demo.example"],
    )
