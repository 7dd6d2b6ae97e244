"""The supervisor of `mailmeta up` on the real pipeline: a part that keeps dying is restarted
later each time (backoff), and parts a killed run left behind are stopped by the next run."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from mailmeta.local.supervisor import RESTART_BACKOFF_S
from tests.kafka_helpers import wait_until
from tests.smtp_helpers import listening
from tests.up_helpers import assert_gone, mailmeta_up, send_smtplib

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.kafka, pytest.mark.timeout(600)]


def test_a_part_that_keeps_dying_is_restarted_later_each_time(tmp_path: Path) -> None:
    with mailmeta_up(tmp_path / "mm") as up:
        waited = []
        for delay in RESTART_BACKOFF_S[:3]:  # 1, 2, 4 s
            killed = up.part_pid("ingest")
            t0 = time.monotonic()
            os.kill(killed, signal.SIGKILL)
            up.wait_line(f"ingest exited (code -9); restarting in {delay:.0f} s", 30)

            def restarted(before: int = killed) -> bool:
                return up.part_pid("ingest") != before

            wait_until(restarted, 30, "ingest restarted")
            waited.append(time.monotonic() - t0)
            # Restarted no sooner than its backoff, and not much later (checked every 0.5 s).
            assert delay <= waited[-1] < delay + 10, (delay, waited)
        # The last restart serves: mail is accepted and stored.
        wait_until(lambda: listening(up.smtp_port), 60, "the restarted ingest listening")
        send_smtplib(up.smtp_port, "canary-backoff")
        up.wait_messages(1, timeout=90)


def test_parts_a_killed_run_left_running_are_stopped_by_the_next_run(tmp_path: Path) -> None:
    data = tmp_path / "mm"
    with mailmeta_up(data) as up:
        broker = up.part_pid("broker")
        # Stopped, the broker cannot act on the SIGTERM its parent's death sends it: it stays,
        # holding the Kafka log's lock, as a part that outlived a killed run does.
        os.kill(broker, signal.SIGSTOP)
        try:
            os.kill(up.proc.pid, signal.SIGKILL)
            up.proc.wait(10)
            with mailmeta_up(data) as up2:
                said = f"stopped broker (pid {broker}) left running by an earlier, unclean stop"
                assert said in up2.output, up2.output[-3000:]
                assert_gone(broker)
                assert up2.part_pid("broker") != broker
                send_smtplib(up2.smtp_port, "canary-leftovers")
                up2.wait_messages(1, timeout=90)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker, signal.SIGKILL)
