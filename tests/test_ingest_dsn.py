"""Delivery status notifications (RFC 3464) to a customer's bounce address become status
events of the original message: real Postfix- and Exchange-shaped reports over a real SMTP
conversation with the running front end, read back from the raw topic."""

from __future__ import annotations

import logging
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from mailmeta.config import ConfigError, Customers, Settings, load_customers, parse_customers
from tests.kafka_helpers import wait_until
from tests.smtp_helpers import Wire, message, read_raw, running_server, write_customers
from tests.up_helpers import mailmeta_up

BOUNCE_ADDRESS = "bounces@demo.example"
SECRET = "CONFIDENTIAL-RETURNED-BODY-7f3a"  # only ever in a returned message's body


def _customers(tmp_path: Path) -> Customers:
    return load_customers(
        write_customers(
            tmp_path / "customers.yaml",
            [
                {
                    "id": "demo",
                    "domains": ["demo.example"],
                    "retention_days": 30,
                    "bounce_addresses": [BOUNCE_ADDRESS],
                    "bounce_domains": ["bounces.demo.example"],
                },
                {"id": "other", "domains": ["other.example"], "retention_days": 30},
            ],
        )
    )


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


# Postfix 3.x "Undelivered Mail Returned to Sender", headers of the original only
# (bounce_notice_recipient defaults; the original's headers as text/rfc822-headers).
POSTFIX_BOUNCE = _crlf(
    """\
Return-Path: <>
Received: by mail.partner.example (Postfix)
	id 7C1E41C0B3; Tue,  1 Jul 2025 10:00:05 +0200 (CEST)
Date: Tue,  1 Jul 2025 10:00:05 +0200 (CEST)
From: MAILER-DAEMON@mail.partner.example (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: bounces@demo.example
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
	boundary="3F2A41C0B2.1751356805/mail.partner.example"
Content-Transfer-Encoding: 7bit
Message-Id: <20250701080005.7C1E41C0B3@mail.partner.example>

This is a MIME-encapsulated message.

--3F2A41C0B2.1751356805/mail.partner.example
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mail.partner.example.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system

<nobody@recipient.example>: host mx1.recipient.example[198.51.100.7] said: 550
    5.1.1 <nobody@recipient.example>: Recipient address rejected: User unknown
    in virtual mailbox table (in reply to RCPT TO command)

--3F2A41C0B2.1751356805/mail.partner.example
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mail.partner.example
X-Postfix-Queue-ID: 3F2A41C0B2
X-Postfix-Sender: rfc822; bounces@demo.example
Arrival-Date: Tue,  1 Jul 2025 10:00:03 +0200 (CEST)

Final-Recipient: rfc822; nobody@recipient.example
Original-Recipient: rfc822;nobody@recipient.example
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx1.recipient.example
Diagnostic-Code: smtp; 550 5.1.1 <nobody@recipient.example>: Recipient address
    rejected: User unknown in virtual mailbox table

--3F2A41C0B2.1751356805/mail.partner.example
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

Return-Path: <bounces@demo.example>
Received: from out.demo.example (out.demo.example [192.0.2.10])
	by mail.partner.example (Postfix) with ESMTPS id 3F2A41C0B2
	for <nobody@recipient.example>; Tue,  1 Jul 2025 10:00:03 +0200 (CEST)
From: Demo Sales <sales@demo.example>
To: nobody@recipient.example
Subject: Quarterly report
Message-ID: <orig-postfix-1@demo.example>
Date: Tue, 01 Jul 2025 10:00:00 +0200

--3F2A41C0B2.1751356805/mail.partner.example--
"""
)

# Exchange Online's NDR: multipart/alternative human part, X-Display-Name and Remote-MTA in
# the recipient block, the whole original returned as message/rfc822; matched by its ENVID
# (xtext: "+2B" is "+"), never by anything in the returned message.
EXCHANGE_NDR = _crlf(
    f"""\
Received: from AM0PR01MB1234.eurprd01.prod.exchangelabs.com (2603:10a6:208:1::1)
 by AM0PR01MB5678.eurprd01.prod.exchangelabs.com with Microsoft SMTP Server
 id 15.20.7741.16 via Mailbox Transport; Tue, 1 Jul 2025 08:01:12 +0000
From: Microsoft Outlook
	<postmaster@fabrikam.onmicrosoft.com>
To: <bounces@demo.example>
Date: Tue, 1 Jul 2025 08:01:12 +0000
Content-Type: multipart/report; report-type=delivery-status;
	boundary="f7a3c2d1-9b8e-4f6a-a5c4-2e1d0b9c8a7f"
X-MS-Exchange-Message-Is-Ndr:
Content-Language: en-US
Message-ID:
 <c1b2a3d4-0000-4000-8000-123456789abc@AM0PR01MB1234.eurprd01.prod.exchangelabs.com>
In-Reply-To: <orig+exchange-1@demo.example>
References: <orig+exchange-1@demo.example>
Subject: Undeliverable: Contract draft
Auto-Submitted: auto-replied
MIME-Version: 1.0

--f7a3c2d1-9b8e-4f6a-a5c4-2e1d0b9c8a7f
Content-Type: multipart/alternative; differences=Content-Type;
	boundary="a1b2c3d4-e5f6-4a5b-8c7d-9e0f1a2b3c4d"

--a1b2c3d4-e5f6-4a5b-8c7d-9e0f1a2b3c4d
Content-Type: text/plain; charset="us-ascii"
Content-Transfer-Encoding: quoted-printable

Your message to jdoe@fabrikam.example couldn't be delivered.
jdoe wasn't found at fabrikam.example.

Diagnostic information for administrators:
Generating server: AM0PR01MB1234.eurprd01.prod.exchangelabs.com
Remote server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not f=
ound by SMTP address lookup'

--a1b2c3d4-e5f6-4a5b-8c7d-9e0f1a2b3c4d
Content-Type: text/html; charset="us-ascii"
Content-Transfer-Encoding: quoted-printable

<html><body><p>Your message to jdoe@fabrikam.example couldn't be delivered.</p></body></html>

--a1b2c3d4-e5f6-4a5b-8c7d-9e0f1a2b3c4d--

--f7a3c2d1-9b8e-4f6a-a5c4-2e1d0b9c8a7f
Content-Type: message/delivery-status

Reporting-MTA: dns;AM0PR01MB1234.eurprd01.prod.exchangelabs.com
Received-From-MTA: dns;out.demo.example
Arrival-Date: Tue, 1 Jul 2025 08:01:10 +0000
Original-Envelope-Id: <orig+2Bexchange-1@demo.example>

Final-Recipient: rfc822;jdoe@fabrikam.example
Action: failed
Status: 5.1.10
Diagnostic-Code: smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not
 found by SMTP address lookup
Remote-MTA: dns;fabrikam-example.mail.protection.outlook.com
X-Display-Name: John Doe

--f7a3c2d1-9b8e-4f6a-a5c4-2e1d0b9c8a7f
Content-Type: message/rfc822

From: Demo Legal <legal@demo.example>
To: John Doe <jdoe@fabrikam.example>
Subject: Contract draft {SECRET}
Message-ID: <returned-copy-must-not-match@demo.example>
Date: Tue, 1 Jul 2025 10:01:00 +0200
MIME-Version: 1.0
Content-Type: text/plain; charset="us-ascii"

Dear John, the draft: {SECRET}

--f7a3c2d1-9b8e-4f6a-a5c4-2e1d0b9c8a7f--
"""
)

# A delay warning to a VERP address of a bounce domain, two recipients in one block each:
# one still retried, one delivered meanwhile (Action: relayed). No headers part, no ENVID.
VERP_DELAY = _crlf(
    """\
From: MAILER-DAEMON@mx.slow.example (Mail Delivery System)
To: bounce+orig-verp-1=demo.example@bounces.demo.example
Subject: Delayed Mail (still being retried)
Message-Id: <delay-1@mx.slow.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B1"

--B1
Content-Type: text/plain

This is the mail system at host mx.slow.example. Still trying.

--B1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.slow.example

Final-Recipient: rfc822; a@slow.example
Action: delayed
Status: 4.4.1
Diagnostic-Code: smtp; 451 4.4.1 connection timed out\x01\x1b[31m
Will-Retry-Until: Fri, 4 Jul 2025 10:00:00 +0200

Final-Recipient: rfc822; b@slow.example
Action: relayed
Status: 2.0.0

--B1--
"""
)


def _report(status_part: str, *, extra_parts: str = "", headers: str = "") -> bytes:
    return _crlf(
        f"""\
From: MAILER-DAEMON@mx.example
To: bounces@demo.example
Subject: broken report
Message-Id: <broken@mx.example>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="ZZ"
{headers}
--ZZ
Content-Type: text/plain

human text

{status_part}{extra_parts}--ZZ--
"""
    )


_HEADERS_PART = "--ZZ\nContent-Type: text/rfc822-headers\n\nMessage-ID: <orig-m@demo.example>\n\n"

MALFORMED: dict[str, bytes] = {
    "no delivery-status part": _report("", extra_parts=_HEADERS_PART),
    "invalid action and status": _report(
        "--ZZ\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example\n\n"
        "Final-Recipient: rfc822; x@y.example\nAction: exploded\nStatus: 9.9.9\n\n",
        extra_parts=_HEADERS_PART,
    ),
    "no per-recipient block": _report(
        "--ZZ\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example\n\n",
        extra_parts=_HEADERS_PART,
    ),
    "original not identifiable": _report(
        "--ZZ\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example\n"
        "Original-Envelope-Id: opaque-queue-id-17\n\n"
        "Final-Recipient: rfc822; x@y.example\nAction: failed\nStatus: 5.0.0\n\n"
    ),
    "report-type is not delivery-status": POSTFIX_BOUNCE.replace(
        b"report-type=delivery-status", b"report-type=disposition-notification"
    ),
    "no boundary at all": _crlf(
        "From: x@mx.example\nSubject: no boundary\nMIME-Version: 1.0\n"
        "Content-Type: multipart/report; report-type=delivery-status\n\n"
        "Action: failed\nStatus: 5.1.1\n"
    ),
    "8-bit garbage and unterminated parts": (
        b"From: \xff\xfe@mx.example\r\nSubject: \xc3\x28\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type="delivery-status"; boundary="Q"\r\n\r\n'
        b"--Q\r\nContent-Type: message/delivery-status\r\n\r\n\xff\xff: \x00\r\n"
        b"Final-Recipient: rfc822; \xff@\xfe\r\nAction: failed\xff\r\nStatus: 5.\xff\r\n"
    ),
    # The delivery-status part starts beyond the parse bound: not read at all.
    "status part beyond the size bound": _report(
        "--ZZ\nContent-Type: text/plain\n\n"
        + ("padding line of a very long human-readable part\n" * 6000)
        + "\n--ZZ\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example\n\n"
        "Final-Recipient: rfc822; x@y.example\nAction: failed\nStatus: 5.1.1\n\n",
        extra_parts=_HEADERS_PART,
    ),
}


def _send(port: int, rcpt: str, content: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as c:
        c.ehlo("mail.partner.example")
        assert c.sendmail("", [rcpt], content) == {}  # MAIL FROM:<> as DSNs are sent


def _events(settings: Settings, count: int) -> list[dict[str, Any]]:
    raw = read_raw(settings, min_count=count)
    assert SECRET.encode() not in b"".join(raw)  # nothing of a returned body travels on
    return [orjson.loads(v) for v in raw]


def test_postfix_exchange_and_verp_reports_become_status_events(
    settings: Settings, tmp_path: Path
) -> None:
    with running_server(settings, _customers(tmp_path)) as srv:
        _send(srv.port, BOUNCE_ADDRESS, POSTFIX_BOUNCE)
        _send(srv.port, BOUNCE_ADDRESS, EXCHANGE_NDR)
        _send(srv.port, "bounce+orig-verp-1=demo.example@bounces.demo.example", VERP_DELAY)
        # The same report to an ordinary address is ordinary mail.
        _send(srv.port, "alice@demo.example", POSTFIX_BOUNCE)
    events = _events(settings, 8)  # 4 reports, 1 + 1 + 2 status events
    assert len(events) == 8
    assert {e["customer_id"] for e in events} == {"demo"}
    by_mid: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_mid.setdefault(e["message_id"], []).append(e)

    # Each report is stored as any mail is: one event, its own headers, status accepted.
    own = [e for e in events if e["status"] == "accepted"]
    assert sorted((e["subject"], e["rcpt_to"][0]) for e in own) == [
        (
            "Delayed Mail (still being retried)",
            "bounce+orig-verp-1=demo.example@bounces.demo.example",
        ),
        ("Undeliverable: Contract draft", BOUNCE_ADDRESS),
        ("Undelivered Mail Returned to Sender", "alice@demo.example"),
        ("Undelivered Mail Returned to Sender", BOUNCE_ADDRESS),
    ]
    assert all(e["mail_from"] == "" for e in own)

    [postfix] = by_mid["<orig-postfix-1@demo.example>"]
    assert postfix["status"] == "bounced"
    assert postfix["rcpt_to"] == ["nobody@recipient.example"]
    assert postfix["smtp_reply"] == (
        "5.1.1 smtp; 550 5.1.1 <nobody@recipient.example>: Recipient address rejected: "
        "User unknown in virtual mailbox table"
    )
    # A status event names the original message and its outcome, nothing of the report's
    # connection or headers.
    for field in ("sender_ip", "helo", "mail_from", "subject", "date", "size_bytes"):
        assert postfix[field] is None, field

    [exchange] = by_mid["<orig+exchange-1@demo.example>"]  # by ENVID, xtext-decoded
    assert (exchange["status"], exchange["rcpt_to"]) == ("bounced", ["jdoe@fabrikam.example"])
    assert exchange["smtp_reply"] == (
        "5.1.10 smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP "
        "address lookup"
    )
    assert "<returned-copy-must-not-match@demo.example>" not in by_mid

    verp = {e["status"]: e for e in by_mid["<orig-verp-1@demo.example>"]}
    assert set(verp) == {"deferred", "delivered"}
    # Control characters (an ANSI escape here) never reach an event.
    assert verp["deferred"]["smtp_reply"] == "4.4.1 smtp; 451 4.4.1 connection timed out [31m"
    assert verp["deferred"]["rcpt_to"] == ["a@slow.example"]
    assert (verp["delivered"]["smtp_reply"], verp["delivered"]["rcpt_to"]) == (
        "2.0.0",
        ["b@slow.example"],
    )


def test_malformed_reports_are_ordinary_mail(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with running_server(settings, _customers(tmp_path)) as srv:
        for content in MALFORMED.values():
            _send(srv.port, BOUNCE_ADDRESS, content)
    events = _events(settings, len(MALFORMED))
    assert len(events) == len(MALFORMED)
    assert {e["status"] for e in events} == {"accepted"}
    assert {e["rcpt_to"][0] for e in events} == {BOUNCE_ADDRESS}
    assert "<orig-m@demo.example>" not in {e["message_id"] for e in events}
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert "Traceback" not in caplog.text
    unusable = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(unusable) == len(MALFORMED)


def test_bounce_settings_are_validated(tmp_path: Path) -> None:
    base = {"id": "demo", "domains": ["demo.example"], "retention_days": 30}

    def problem(**demo: Any) -> str:
        other = {"id": "other", "domains": ["other.example"], "retention_days": 30}
        with pytest.raises(ConfigError) as exc:
            parse_customers({"customers": [{**base, **demo}, other]}, "customers.yaml")
        return str(exc.value)

    assert "bounce_addresses" in problem(bounce_addresses=["bounce+x@demo.example"])
    assert "bounce_addresses" in problem(bounce_addresses=["no-at-sign"])
    assert "bounce_domains" in problem(bounce_domains=["not a domain"])
    assert "already belongs to 'other'" in problem(bounce_domains=["other.example"])
    assert "is at a domain of 'other'" in problem(bounce_addresses=["b@other.example"])
    ok = parse_customers(
        {"customers": [{**base, "bounce_addresses": ["Bounces@Demo.Example."]}]}, "c.yaml"
    )
    assert ok.by_id["demo"].bounce_addresses == ["bounces@demo.example"]


@pytest.mark.e2e
@pytest.mark.slow
def test_bounce_shows_in_the_message_history(tmp_path: Path) -> None:
    """The whole pipeline (`mailmeta up` on Tansu): the original message's history in the
    API reads accepted, then bounced with the DSN's status and diagnostic."""
    keep = {f: "keep" for f in ("message_id", "rcpt_to", "subject", "smtp_reply")}
    config = write_customers(
        tmp_path / "customers.yaml",
        [
            {
                "id": "demo",
                "domains": ["demo.example"],
                "retention_days": 30,
                "bounce_addresses": [BOUNCE_ADDRESS],
                "policy": keep,
            }
        ],
    )
    original = _crlf(
        "From: sales@demo.example\nTo: team@demo.example\nSubject: Quarterly report\n"
        "Message-ID: <orig-postfix-1@demo.example>\nDate: Tue, 01 Jul 2025 10:00:00 +0200\n\n"
        "body\n"
    )
    with mailmeta_up(tmp_path / "mm", "--broker", "tansu", config=config) as up:
        with smtplib.SMTP("127.0.0.1", up.smtp_port, timeout=30) as c:
            c.ehlo("out.demo.example")
            c.mail("sales@demo.example")
            assert c.rcpt("team@demo.example")[0] == 250
            code, text = c.data(original)
            assert code == 250
        event_id = text.decode().rsplit(" ", 1)[1]
        _send(up.smtp_port, BOUNCE_ADDRESS, POSTFIX_BOUNCE)
        deadline = time.monotonic() + 60
        history: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            r = httpx.get(
                f"{up.api}/v1/messages/{event_id}",
                params={"customer": "demo"},
                headers=up.headers,
                timeout=10,
            )
            if r.status_code == 200:
                history = r.json()["history"]
                if len(history) >= 2:
                    break
            time.sleep(0.3)
        assert [h["status"] for h in history] == ["accepted", "bounced"], up.output[-3000:]
        bounced = history[1]
        assert bounced["message_id"] == "<orig-postfix-1@demo.example>"
        assert bounced["rcpt_to"] == ["nobody@recipient.example"]
        assert bounced["smtp_reply"].startswith("5.1.1 smtp; 550 5.1.1 <nobody@recipient.example>")
        # The report itself is one more stored message, found under its own Message-ID.
        report = up.messages(message_id="<20250701080005.7C1E41C0B3@mail.partner.example>")
        assert [m["subject"] for m in report] == ["Undelivered Mail Returned to Sender"]
        up.stop()
    assert up.proc.returncode == 0, up.output[-3000:]


def _nested_report(depth: int = 900, size: int = 262_143) -> bytes:
    """The probe's report: multipart/report nested ``depth`` levels deep, every boundary
    left open, short filler lines up to ``size`` bytes (the stdlib parser checks each line
    against each open boundary)."""
    head = _crlf(
        "From: MAILER-DAEMON@mx.example\nTo: bounces@demo.example\nSubject: nested report\n"
        "Message-Id: <nested@mx.example>\nMIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b0"\n\n'
    )
    levels = b"".join(
        b'--b%d\r\nContent-Type: multipart/report; report-type=delivery-status; boundary="b%d"'
        b"\r\n\r\n" % (i - 1, i)
        for i in range(1, depth)
    )
    content = head + levels
    content += b"x\r\n" * ((size - len(content)) // 3)
    return content + b"\r\n" * ((size - len(content)) // 2)


def _ready_for_data(port: int, rcpt: str) -> Wire:
    w = Wire(port)
    assert w.cmd("EHLO mail.partner.example")[0] == 250
    assert w.cmd("MAIL FROM:<>")[0] == 250
    assert w.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert w.cmd("DATA")[0] == 354
    return w


def test_nested_reports_do_not_stall_other_sessions(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    bomb = _nested_report()
    assert len(bomb) in (262_142, 262_143)
    replies: dict[int, tuple[tuple[int, str], float]] = {}

    def send_bomb(i: int, w: Wire) -> None:
        t0 = time.monotonic()
        reply = w.send(bomb + b".\r\n")
        replies[i] = (reply, time.monotonic() - t0)

    with running_server(settings, _customers(tmp_path)) as srv:
        bombs = [_ready_for_data(srv.port, BOUNCE_ADDRESS) for _ in range(3)]
        normal = _ready_for_data(srv.port, "alice@demo.example")
        try:
            senders = [threading.Thread(target=send_bomb, args=(i, w)) for i, w in enumerate(bombs)]
            for t in senders:
                t.start()
            # Once the server has all three reports (the last byte sent), a normal mail.
            wait_until(lambda: not any(t.is_alive() for t in senders) or srv.handler.in_flight,
                       timeout=10, what="the reports arriving")  # fmt: skip
            t0 = time.monotonic()
            assert normal.send(message("normal mail") + b".\r\n")[0] == 250
            normal_s = time.monotonic() - t0
            for t in senders:
                t.join(30)
        finally:
            for w in [*bombs, normal]:
                w.close()
    assert normal_s < 1.0, f"a normal mail waited {normal_s:.2f} s"
    # Each report got a clear reply, promptly: accepted as ordinary mail, its status unused.
    for (code, text), took in replies.values():
        assert code == 250 and text.startswith("2.0.0 Ok: queued as "), text
        assert took < 5.0, took
    assert len(replies) == 3
    events = _events(settings, 4)
    assert sorted(e["subject"] for e in events) == ["nested report"] * 3 + ["normal mail"]
    assert {e["status"] for e in events} == {"accepted"}
    unused = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(unused) == 3
    assert all(m.endswith("not used: more than 10 multipart boundaries") for m in unused)
