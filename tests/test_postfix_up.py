"""`mailmeta up --milter-port --maillog` beside a real Postfix the user runs: a message's
history, from reception (the milter) to delivery (the log follower), redacted and stored,
read back through the query API."""

from __future__ import annotations

import smtplib
import uuid
from pathlib import Path

import pytest

from mailmeta.local.process import free_port
from tests.kafka_helpers import wait_until
from tests.postfix_helpers import Postfix, available
from tests.smtp_helpers import NextHop, message
from tests.up_helpers import mailmeta_up, need_tools

pytestmark = pytest.mark.skipif(
    not available(), reason="needs root and .tools (tests/tools/fetch.sh)"
)


def test_a_message_history_from_postfix_through_mailmeta_up(tmp_path: Path) -> None:
    need_tools()
    milter_port = free_port()
    milter = f"{{ inet:127.0.0.1:{milter_port}, connect_timeout=5s, default_action=accept }}"
    mid = f"<{uuid.uuid4().hex}@sender.example>"
    with (
        NextHop() as hop,
        Postfix(relayhost=hop.address, milter=milter) as pf,
        mailmeta_up(
            tmp_path / "data", "--milter-port", str(milter_port), "--maillog", str(pf.maillog)
        ) as up,
    ):
        assert "milter" in up.output and "maillog" in up.output
        with smtplib.SMTP("127.0.0.1", pf.port) as s:
            s.sendmail("sender@example.org", ["alice@demo.example"], message(message_id=mid))

        def history() -> list[dict[str, object]] | None:
            rows = [r for r in up.all_messages() if r["message_id"] == mid]
            return rows if len(rows) >= 2 else None

        rows = wait_until(history, 90, "both events of the message in the store")
        up.stop()
    assert sorted(r["status"] for r in rows) == ["accepted", "delivered"]
    for r in rows:
        assert r["rcpt_to"] != ["alice@demo.example"]  # the demo policy masks recipients
        assert r.get("helo") is None  # helo: drop
