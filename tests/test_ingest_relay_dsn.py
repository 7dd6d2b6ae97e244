"""DSN parameters (RFC 3461) in relay mode: RET/ENVID on MAIL and NOTIFY/ORCPT on RCPT are
accepted, checked, passed on to a next hop that offers DSN and left off toward one that does
not; malformed ones get a 501 and nothing is relayed or recorded; no value reaches a log.
Real SMTP conversations with the front end on a real broker and real next hops (aiosmtpd on
loopback) that keep the MAIL/RCPT commands they received."""

from __future__ import annotations

import logging
import smtplib
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP

from mailmeta.config import Customers, Settings, load_customers
from tests.smtp_helpers import NextHop, message, read_events, running_server, write_customers

RCPTS = ["alice@demo.example", "bob@demo.example", "carol@demo.example"]
QUEUED = "2.0.0 Ok: queued as NEXTHOP1"
# Distinctive values (ENVID and ORCPT name people): none may appear in a log.
ENVID = "Env7f3a.Secret+2Bid@Demo.example"  # mixed case: passed on exactly as sent
ORCPT = "rfc822;Alice+2Bprivate@demo.example"
DSN_KEYWORDS = ("RET", "ENVID", "NOTIFY", "ORCPT")


class RecordingHop(NextHop):
    """A :class:`NextHop` that keeps the argument of every MAIL and RCPT it receives and,
    with ``dsn``, advertises DSN and accepts its parameters (aiosmtpd itself answers 555
    to them, so a hop without ``dsn`` refuses any that reach it)."""

    def __init__(self, *, dsn: bool) -> None:
        super().__init__()
        self.commands: list[tuple[str, str]] = []
        hop = self

        class Hop(SMTP):
            async def smtp_MAIL(self, arg: str | None) -> None:
                hop.commands.append(("MAIL", arg or ""))
                await super().smtp_MAIL(_without_dsn(arg) if dsn else arg)

            async def smtp_RCPT(self, arg: str | None) -> None:
                hop.commands.append(("RCPT", arg or ""))
                await super().smtp_RCPT(_without_dsn(arg) if dsn else arg)

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
                hop.received.append(
                    (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
                )
                return hop.reply

        class DsnHandler(Handler):
            async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
                session.host_name = hostname
                return [*responses[:-1], "250-DSN", responses[-1]]

        handler = DsnHandler if dsn else Handler
        self._factory = lambda: Hop(handler(), hostname="nexthop.test", loop=self.loop)

    def params(self, verb: str) -> list[dict[str, str]]:
        """The parameters of each ``verb`` command received: keyword -> value."""
        return [
            dict(p.partition("=")[::2] for p in arg.partition(">")[2].split())
            for v, arg in self.commands
            if v == verb
        ]


def _without_dsn(arg: str | None) -> str | None:
    if arg is None:
        return None
    path, _, params = arg.partition(">")
    kept = [p for p in params.split() if p.partition("=")[0].upper() not in DSN_KEYWORDS]
    return " ".join([path + ">", *kept])


def _customers(tmp_path: Path) -> Customers:
    return load_customers(
        write_customers(
            tmp_path / "customers.yaml",
            [{"id": "demo", "domains": ["demo.example"], "retention_days": 30}],
        )
    )


def _relaying(settings: Settings, hop: NextHop) -> Settings:
    return settings.model_copy(update={"relay_to": hop.address})


def _send_with_dsn(port: int, subject: str) -> tuple[int, str]:
    """One message with RET/ENVID and, per recipient, NOTIFY/ORCPT (the third none)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.example.org")
        assert c.has_extn("dsn")
        assert c.mail("bob@example.org", ["RET=hdrs", f"ENVID={ENVID}"])[0] == 250
        assert c.rcpt(RCPTS[0], ["NOTIFY=delay,Success", f"ORCPT={ORCPT}"])[0] == 250
        assert c.rcpt(RCPTS[1], ["NOTIFY=NEVER"])[0] == 250
        assert c.rcpt(RCPTS[2])[0] == 250
        code, text = c.data(message(subject))
        return code, text.decode()


def _no_values_logged(caplog: pytest.LogCaptureFixture, *values: str) -> None:
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    for value in values:
        assert value not in text and value.lower() not in text.lower()


def test_dsn_parameters_passed_to_a_hop_offering_dsn(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    customers = _customers(tmp_path)
    # A terminal sink would owe "delivered" notices it never sends: no DSN offered there.
    with running_server(settings, customers) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as c:
            c.ehlo("client.example.org")
            assert not c.has_extn("dsn")
            assert c.mail("bob@example.org", ["RET=FULL"])[0] == 555
    with RecordingHop(dsn=True) as hop:
        with running_server(_relaying(settings, hop), customers) as srv:
            assert _send_with_dsn(srv.port, "dsn hop") == (250, QUEUED)
        assert [rcpts for _, rcpts, _ in hop.received] == [RCPTS]
        mail = hop.params("MAIL")
        rcpt = hop.params("RCPT")
    assert len(mail) == 1
    assert (mail[0]["RET"], mail[0]["ENVID"]) == ("HDRS", ENVID)
    assert rcpt == [
        {"NOTIFY": "SUCCESS,DELAY", "ORCPT": ORCPT},
        {"NOTIFY": "NEVER"},
        {},
    ]
    (event,) = read_events(settings, min_count=1)
    assert (event["subject"], event["status"]) == ("dsn hop", "delivered")
    assert event["rcpt_to"] == RCPTS
    _no_values_logged(caplog, ENVID, ORCPT, "Alice+2Bprivate")


def test_dsn_parameters_left_off_toward_a_hop_without_dsn(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with RecordingHop(dsn=False) as hop:
        with running_server(_relaying(settings, hop), _customers(tmp_path)) as srv:
            # The hop answers 555 to any DSN parameter: a 250 means none reached it.
            assert _send_with_dsn(srv.port, "plain hop") == (250, QUEUED)
        assert [rcpts for _, rcpts, _ in hop.received] == [RCPTS]
        for verb, arg in hop.commands:
            assert not any(k in arg.upper() for k in ("RET=", "ENVID=", "NOTIFY=", "ORCPT=")), verb
    (event,) = read_events(settings, min_count=1)
    assert (event["subject"], event["status"]) == ("plain hop", "delivered")
    _no_values_logged(caplog, ENVID, ORCPT)


BAD_MAIL = [
    ("RET=NONE", "RET"),
    ("RET", "RET"),
    ("ENVID=lower+2bhex", "ENVID"),  # xtext hex digits are upper case
    ("ENVID=has=equals", "ENVID"),
    ("ENVID=plus+", "ENVID"),
    ("ENVID=" + "e" * 101, "ENVID"),
    ("ENVID", "ENVID"),
]
BAD_RCPT = [
    ("NOTIFY=NEVER,SUCCESS", "NOTIFY"),
    ("NOTIFY=SOMETIMES", "NOTIFY"),
    ("NOTIFY=SUCCESS,", "NOTIFY"),
    ("ORCPT=no-type.secret@demo.example", "ORCPT"),
    ("ORCPT=rfc822;a=b.secret@demo.example", "ORCPT"),
    ("ORCPT=rfc822;" + "o" * 494, "ORCPT"),  # 501 characters
]


def test_malformed_dsn_parameters_refused(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with RecordingHop(dsn=True) as hop:
        with running_server(_relaying(settings, hop), _customers(tmp_path)) as srv:
            with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as c:
                c.ehlo("client.example.org")
                for param, name in BAD_MAIL:
                    code, text = c.mail("bob@example.org", [param])
                    assert (code, text.decode().split(" ")[:3]) == (
                        501,
                        ["5.5.4", "Invalid", name],
                    ), param
                    value = param.partition("=")[2]
                    assert not value or value not in text.decode()  # never echoed
                code, text = c.mail("bob@example.org", ["ENVID=A", "envid=B"])
                assert (code, text) == (501, b"5.5.4 Duplicate ENVID parameter")
                assert c.mail("bob@example.org")[0] == 250  # refused MAILs left no sender
                for param, name in BAD_RCPT:
                    code, text = c.rcpt(RCPTS[0], [param])
                    assert (code, text.decode().split(" ")[:3]) == (
                        501,
                        ["5.5.4", "Invalid", name],
                    ), param
                    if name == "ORCPT":  # an address: never echoed
                        assert param.partition("=")[2] not in text.decode()
                # No recipient was taken: there is nothing to send.
                assert c.docmd("DATA")[0] == 503
                # At the bounds: a 500-character ORCPT (a RCPT line over 512), then RSET.
                longest = ["NOTIFY=FAILURE", "ORCPT=rfc822;" + "o" * 493]
                assert c.rcpt(RCPTS[1], longest)[0] == 250
                assert c.rset()[0] == 250
            # Then a well-formed message on the same server: the only one relayed and recorded.
            assert _send_with_dsn(srv.port, "sentinel") == (250, QUEUED)
        assert [rcpts for _, rcpts, _ in hop.received] == [RCPTS]
    assert [e["subject"] for e in read_events(settings, min_count=1)] == ["sentinel"]
    _no_values_logged(
        caplog, "lower+2bhex", "has=equals", "e" * 101, "no-type.secret", "a=b.secret",
        "o" * 494, ENVID, ORCPT,
    )  # fmt: skip
