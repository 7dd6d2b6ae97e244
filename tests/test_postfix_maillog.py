"""`mailmeta maillog` against a real Postfix (tests/postfix_helpers.py) and Apache Kafka:
delivery histories from Postfix's own log, rotation, and SIGKILL of the follower."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from mailmeta.config import Settings, load_customers
from mailmeta.ingest.postfix._maillog import LogParser
from mailmeta.local.process import free_port
from mailmeta.schema import encode_event
from tests.conftest import EXAMPLE_CONFIG
from tests.kafka_helpers import Stage, run_stage, settings_env, wait_until
from tests.postfix_helpers import Postfix, available
from tests.smtp_helpers import NextHop, message, read_raw

needs_postfix = pytest.mark.skipif(
    not available(), reason="needs root and .tools (tests/tools/fetch.sh)"
)

# Lines as Postfix 3.7 writes them to its maillog_file (from a run of the harness).
LOG = """\
Dec 08 01:40:15 postfix postfix/smtpd[27395]: 68AF29841F8: client=unknown[192.0.2.9]
Dec 08 01:40:15 postfix postfix/cleanup[27397]: 68AF29841F8: message-id=<m1@sender.example>
Dec 08 01:40:15 postfix postfix/qmgr[27393]: 68AF29841F8: from=<s@example.org>, size=310, nrcpt=2 (queue active)
Dec 08 01:40:15 postfix postfix/smtp[27398]: 68AF29841F8: to=<bob@demo.example>, relay=127.0.0.1[127.0.0.1]:2782, delay=0.02, delays=0.01/0/0.01/0, dsn=4.4.1, status=deferred (connect to 127.0.0.1[127.0.0.1]:2782: Connection refused)
Dec 08 01:40:15 postfix postfix/smtp[27398]: 68AF29841F8: to=<x@other.example>, relay=127.0.0.1[127.0.0.1]:2782, delay=0.02, delays=0.01/0/0.01/0, dsn=4.4.1, status=deferred (connect to 127.0.0.1[127.0.0.1]:2782: Connection refused)
Dec 08 01:40:17 postfix postfix/smtp[27398]: 68AF29841F8: to=<bob@demo.example>, relay=127.0.0.1[127.0.0.1]:2782, delay=2, delays=2/0/0.01/0, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as NEXTHOP1)
Dec 08 01:40:17 postfix postfix/qmgr[27393]: 68AF29841F8: removed
Dec 08 01:40:18 postfix postfix/smtpd[27395]: NOQUEUE: reject: RCPT from unknown[192.0.2.9]: 554 5.7.1 <no@demo.example>: Recipient address rejected: Access denied; from=<s@example.org> to=<no@demo.example> proto=ESMTP helo=<client.test>
"""


def test_the_parser_joins_lines_on_the_queue_id_and_counts_attempts() -> None:
    parser = LogParser(load_customers(EXAMPLE_CONFIG))
    events = [e.to_dict() for line in LOG.splitlines() for e in parser.feed(line)]
    shown = [(e["status"], e["rcpt_to"], e["smtp_reply"]) for e in events]
    assert shown == [
        (
            "deferred",
            ["bob@demo.example"],
            "4.4.1 (attempt 1, relay 127.0.0.1[127.0.0.1]:2782) "
            "connect to 127.0.0.1[127.0.0.1]:2782: Connection refused",
        ),
        (
            "delivered",
            ["bob@demo.example"],
            "2.0.0 (attempt 2, relay 127.0.0.1[127.0.0.1]:2782) 250 2.0.0 Ok: queued as NEXTHOP1",
        ),
        (
            "rejected",
            ["no@demo.example"],
            "554 5.7.1 <no@demo.example>: Recipient address rejected: Access denied",
        ),
    ]
    for e in events[:2]:
        assert (e["message_id"], e["mail_from"], e["sender_ip"], e["size_bytes"]) == (
            "<m1@sender.example>",
            "s@example.org",
            "192.0.2.9",
            310,
        )
    assert events[2]["helo"] == "client.test" and events[2]["message_id"] is None
    assert parser.queue == {}  # "removed" forgot the queue id
    times = [e["received_at"] for e in events]
    assert times == sorted(set(times))  # strictly increasing: the log's order survives


@contextmanager
def follower(settings: Settings, pf: Postfix, position: Path) -> Iterator[Stage]:
    with run_stage(
        "mailmeta",
        settings,
        "mailmeta maillog: following",
        args=["maillog", "--file", str(pf.maillog), "--position", str(position)],
    ) as stage:
        yield stage


def _events(settings: Settings, n: int = 1) -> list[dict[str, Any]]:
    """The raw topic's events in time order (events with different keys sit on different
    partitions: the topic's order is not theirs; UUIDv7 ids sort by time)."""
    events = [orjson.loads(r) for r in read_raw(settings, min_count=n, timeout=3)]
    return sorted(events, key=lambda e: (e["received_at"], e["event_id"]))


def _history(events: list[dict[str, Any]], rcpt: str) -> list[str]:
    return [e["status"] for e in events if e["rcpt_to"] == [rcpt]]


@needs_postfix
def test_delivered_deferred_then_delivered_bounced_and_rejected(
    settings: Settings, tmp_path: Path
) -> None:
    reject = "check_recipient_access inline:{ refused@demo.example=REJECT }"
    with (
        NextHop() as hop,
        Postfix(relayhost=hop.address, extra={"smtpd_recipient_restrictions": reject}) as pf,
        follower(settings, pf, tmp_path / "pos") as stage,
    ):
        hop.rcpt_replies["later@demo.example"] = "451 4.3.0 Try again later"
        hop.rcpt_replies["gone@demo.example"] = "550 5.1.1 No such user"
        mids = {}
        with smtplib.SMTP("127.0.0.1", pf.port, local_hostname="client.test") as s:
            for rcpt in ("ok@demo.example", "later@demo.example", "gone@demo.example"):
                mids[rcpt] = f"<{uuid.uuid4().hex}@sender.example>"
                s.sendmail("sender@example.org", [rcpt], message(message_id=mids[rcpt]))
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                s.sendmail("sender@example.org", ["refused@demo.example"], message())
        wait_until(
            lambda: "deferred" in _history(_events(settings), "later@demo.example"),
            60,
            "the deferral",
        )
        del hop.rcpt_replies["later@demo.example"]  # the next hop takes it now
        try:
            events = wait_until(
                lambda: (
                    (ev := _events(settings, 4))
                    and "delivered" in _history(ev, "later@demo.example")
                    and ev
                ),
                90,
                "delivery after the deferral",
            )
        except AssertionError as exc:  # what Postfix did instead (test addresses only)
            raise AssertionError(f"{exc}\n{pf.log_text()[-4000:]}") from None
        output = stage.output
    assert _history(events, "ok@demo.example") == ["delivered"]
    later = _history(events, "later@demo.example")
    assert later[-1] == "delivered" and set(later[:-1]) == {"deferred"}
    assert _history(events, "gone@demo.example") == ["bounced"]
    assert _history(events, "refused@demo.example") == ["rejected"]
    by_rcpt = {e["rcpt_to"][0]: e for e in events}
    for rcpt, mid in mids.items():
        assert by_rcpt[rcpt]["message_id"] == mid
        assert by_rcpt[rcpt]["mail_from"] == "sender@example.org"
        assert by_rcpt[rcpt]["sender_ip"] == "127.0.0.1"
        assert by_rcpt[rcpt]["size_bytes"] > 0
    deferrals = [e for e in events if e["status"] == "deferred"]
    assert deferrals[0]["smtp_reply"].startswith("4.3.0 (attempt 1, relay 127.0.0.1")
    assert "451 4.3.0 Try again later" in deferrals[0]["smtp_reply"]
    assert by_rcpt["later@demo.example"]["smtp_reply"].startswith(
        f"2.0.0 (attempt {len(deferrals) + 1}, "
    )
    assert "5.1.1" in by_rcpt["gone@demo.example"]["smtp_reply"]
    assert by_rcpt["refused@demo.example"]["helo"] == "client.test"
    # No log line, and no address, in the follower's own output.
    assert "@" not in output


@needs_postfix
def test_rotation_and_sigkill_of_the_follower_skip_nothing_and_double_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    position = tmp_path / "pos"
    sent: list[str] = []

    def send(n: int) -> None:
        with smtplib.SMTP("127.0.0.1", pf.port) as s:
            for _ in range(n):
                rcpt = f"r{len(sent)}@demo.example"
                sent.append(rcpt)
                s.sendmail("s@example.org", [rcpt], message())

    def delivered() -> Counter[str]:
        ids: dict[str, set[str]] = {}
        for e in _events(settings, len(sent)):
            if e["status"] == "delivered":
                ids.setdefault(e["rcpt_to"][0], set()).add(e["event_id"])
        return Counter({r: len(v) for r, v in ids.items()})

    with NextHop() as hop, Postfix(relayhost=hop.address) as pf:
        with follower(settings, pf, position) as stage:
            send(5)
            wait_until(lambda: len(delivered()) == 5, 60, "5 delivered events")
            # Rotation by rename, while mail flows: the rest of the old file is read first.
            os.rename(pf.maillog, pf.maillog.with_name("maillog.1"))
            send(5)
            pf.reload()  # postlogd reopens maillog_file
            send(5)
            wait_until(lambda: len(delivered()) == 15, 60, "15 delivered events")
            # Truncation in place.
            os.truncate(pf.maillog, 0)
            send(5)
            wait_until(lambda: len(delivered()) == 20, 60, "20 delivered events")
            # SIGKILL mid-stream; what Postfix logs meanwhile is read after the restart.
            send(5)
            os.kill(stage.proc.pid, signal.SIGKILL)
            assert stage.proc.wait(10) == -signal.SIGKILL
            send(5)
            wait_until(lambda: len(hop.received) == 30, 60, "30 deliveries")
        with follower(settings, pf, position):
            counts = wait_until(lambda: (c := delivered()) and len(c) == 30 and c, 60, "30")
    assert set(counts) == set(sent)
    assert set(counts.values()) == {1}  # one event id per delivery: nothing doubled


@needs_postfix
def test_expired_after_the_queue_lifetime(settings: Settings, tmp_path: Path) -> None:
    lifetime = {"maximal_queue_lifetime": "0", "bounce_queue_lifetime": "0"}
    with (
        NextHop() as hop,
        Postfix(relayhost=hop.address, extra=lifetime) as pf,
        follower(settings, pf, tmp_path / "pos"),
    ):
        hop.rcpt_replies["late@demo.example"] = "451 4.3.0 Try again later"
        with smtplib.SMTP("127.0.0.1", pf.port) as s:
            s.sendmail("sender@example.org", ["late@demo.example"], message())
        events = wait_until(lambda: (ev := _events(settings, 2)) and len(ev) >= 2 and ev)
    assert _history(events, "late@demo.example") == ["deferred", "expired"]
    [expired] = [e for e in events if e["status"] == "expired"]
    assert expired["smtp_reply"] == "expired after 1 attempt(s)"
    assert expired["mail_from"] == "sender@example.org"


class ReinjectingFilter(NextHop):
    """A content filter: takes each message over SMTP and hands it back to Postfix's
    re-injection listener, answering with Postfix's own reply ("… queued as NEWID")."""

    def __init__(self) -> None:
        super().__init__()
        self.reinject_port = 0
        hop = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
                def reinject() -> str:
                    with smtplib.SMTP("127.0.0.1", hop.reinject_port) as s:
                        s.ehlo()
                        s.mail(envelope.mail_from)
                        for rcpt in envelope.rcpt_tos:
                            s.rcpt(rcpt)
                        code, text = s.data(envelope.original_content)
                    return f"{code} {text.decode()}"

                return await asyncio.to_thread(reinject)

        from aiosmtpd.smtp import SMTP

        self._factory = lambda: SMTP(Handler(), hostname="filter.test", loop=self.loop)


@needs_postfix
def test_a_content_filter_hop_is_followed_not_reported(settings: Settings, tmp_path: Path) -> None:
    reinject = free_port()
    with NextHop() as hop, ReinjectingFilter() as filt:
        filt.reinject_port = reinject
        host, port = filt.address.split(":")
        master = (
            "scan unix - - n - 4 smtp\n"
            f"127.0.0.1:{reinject} inet n - n - - smtpd\n"
            "  -o content_filter=\n  -o smtpd_milters=\n"
        )
        extra = {"content_filter": f"scan:[{host}]:{port}"}
        with (
            Postfix(relayhost=hop.address, extra=extra, master_extra=master) as pf,
            follower(settings, pf, tmp_path / "pos"),
        ):
            mid = f"<{uuid.uuid4().hex}@sender.example>"
            with smtplib.SMTP("127.0.0.1", pf.port) as s:
                s.sendmail("sender@example.org", ["f@demo.example"], message(message_id=mid))
            wait_until(lambda: hop.received, 60, "delivery after the filter")
            wait_until(lambda: pf.log_text().count("status=sent") >= 2, 30, "both hops logged")
            events = wait_until(lambda: _events(settings, 1), 30, "the delivered event")
            log_text = pf.log_text()
            hop_port = hop.address.split(":")[1]
    assert "queued as" in log_text and f"relay=127.0.0.1[127.0.0.1]:{port}" in log_text
    assert [(e["status"], e["message_id"]) for e in events] == [("delivered", mid)]
    assert f"]:{hop_port})" in events[0]["smtp_reply"]  # the real hop, not the filter


def test_a_reused_queue_id_starts_afresh() -> None:
    parser = LogParser(load_customers(EXAMPLE_CONFIG))
    second = [
        *LOG.splitlines()[:3],
        "Dec 08 01:41:00 postfix postfix/qmgr[1]: 68AF29841F8: removed",
        "Dec 08 01:42:00 postfix postfix/smtpd[2]: 68AF29841F8: client=unknown[198.51.100.1]",
        "Dec 08 01:42:00 postfix postfix/cleanup[3]: 68AF29841F8: message-id=<m2@x.example>",
        "Dec 08 01:42:01 postfix postfix/smtp[4]: 68AF29841F8: to=<c@demo.example>, "
        "relay=none, delay=1, delays=1/0/0/0, dsn=2.0.0, status=sent (250 ok)",
    ]
    [event] = [e for line in second for e in parser.feed(line)]
    assert (event.message_id, event.sender_ip, event.mail_from, event.size_bytes) == (
        "<m2@x.example>",
        "198.51.100.1",
        None,  # not the earlier message's sender
        None,
    )


def test_standard_input_is_followed_to_its_end(settings: Settings) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mailmeta", "maillog"],
        input=LOG.encode(),
        env=settings_env(settings),
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    events = [orjson.loads(r) for r in read_raw(settings, min_count=3)]
    assert sorted(e["status"] for e in events) == ["deferred", "delivered", "rejected"]
    assert b"@" not in done.stdout + done.stderr  # no line, no address in its output


def test_the_batch_in_flight_at_a_sigkill_is_sent_again_with_its_own_ids(
    settings: Settings, tmp_path: Path
) -> None:
    """The state a SIGKILL leaves between writing the position and the broker's
    acknowledgement: the follower sends those very records, and reads on after them."""
    log_file = tmp_path / "maillog"
    log_file.write_text(LOG, encoding="utf-8")
    parser = LogParser(load_customers(EXAMPLE_CONFIG))
    inflight = [e for line in LOG.splitlines() for e in parser.feed(line)]
    position = tmp_path / "pos"
    position.write_bytes(
        orjson.dumps(
            {
                "inode": log_file.stat().st_ino,
                "offset": len(LOG.encode()),
                "state": parser.state(),
                "inflight": [encode_event(e).decode() for e in inflight],
            }
        )
    )
    args = ["maillog", "--file", str(log_file), "--position", str(position)]
    with run_stage("mailmeta", settings, "maillog: following", args=args):
        with log_file.open("a", encoding="utf-8") as f:
            f.write(LOG.splitlines()[-1].replace("no@", "again@") + "\n")
        raws = wait_until(lambda: read_raw(settings, min_count=4), 30, "four events")
    events = {e["event_id"]: e for e in map(orjson.loads, raws)}
    assert len(raws) == 4
    again = [e for e in events.values() if e["rcpt_to"] == ["again@demo.example"]]
    assert len(again) == 1
    assert set(events) - {again[0]["event_id"]} == {e.event_id for e in inflight}
    assert orjson.loads(position.read_bytes())["inflight"] == []
