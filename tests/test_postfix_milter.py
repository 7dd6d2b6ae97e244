"""The Postfix integration's read-only milter, against a real Postfix (tests/postfix_helpers.py)."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.kafka_helpers import wait_until
from tests.postfix_helpers import Postfix, available
from tests.smtp_helpers import NextHop

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
