"""Hardening of the SMTP front end, each on a real SMTP conversation with the real server:
command injection, STARTTLS, odd charsets, reply codes, privacy of logs and replies, AUTH
cost, PROXY protocol."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest

from mailmeta.config import Customers, Settings, load_customers
from mailmeta.ingest import hash_password
from mailmeta.ingest._relay import relay
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
    down = _with(settings, kafka_bootstrap=f"127.0.0.1:{_closed_port()}")
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


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
