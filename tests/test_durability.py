"""`mailmeta up` keeps what it acknowledged and what operators set, through kills and restarts.

Every test runs the real pipeline (`mailmeta up`: Apache Kafka, the faust worker, the sink on
embedded ClickHouse, the SMTP front end) as subprocesses, sends mail over real SMTP, and kills
processes by their PIDs with SIGKILL.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from confluent_kafka.admin import AdminClient

from tests.kafka_helpers import wait_until
from tests.up_helpers import (
    MAILMETA,
    Stream,
    Up,
    assert_gone,
    assert_stored_once,
    broker_bootstrap,
    mailmeta_up,
    message,
    send_batch,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]


def test_sigkill_of_the_whole_tree_loses_no_acknowledged_mail(tmp_path: Path) -> None:
    data = tmp_path / "mm"
    with mailmeta_up(data) as up:
        acked = send_batch(up.smtp_port, 240)
        up.kill_tree()  # at once: most of these are still in the broker or the worker
    with mailmeta_up(data) as up2:
        assert_stored_once(up2, acked)
        assert len(up2.messages(limit="1000")) == 240


@pytest.mark.parametrize("part", ["broker", "streams", "sink", "ingest"])
def test_a_killed_part_is_restarted_and_nothing_acknowledged_is_lost(
    part: str, tmp_path: Path
) -> None:
    with mailmeta_up(tmp_path / "mm") as up, Stream(up.smtp_port) as stream:
        stream.wait_acked(30)
        killed = up.part_pid(part)
        up.kill_part(part)
        if part == "broker":
            _assert_broker_serves_again(up, killed)
        else:
            up.wait_line(f"{part:<8} restarted", 90)
        stream.wait_acked(30, timeout=120)  # mail flows again
    assert stream.acked
    # Refused mail got a temporary SMTP failure (or no reply while ingest was down).
    assert all(code == 0 or 400 <= code < 500 for code in stream.refused), stream.refused
    with mailmeta_up(tmp_path / "mm") as up2:
        assert_stored_once(up2, stream.acked)


def _assert_broker_serves_again(up: Up, killed: int) -> None:
    """A new broker process (not the spool) serves the port: the killed PID is gone, a new
    one is alive, and the broker answers on its address."""
    deadline = time.monotonic() + 90
    while up.part_pid("broker") == killed:
        assert time.monotonic() < deadline, f"broker not restarted:\n{up.output[-3000:]}"
        time.sleep(0.2)
    assert_gone(killed)
    new = up.part_pid("broker")
    os.kill(new, 0)  # alive
    AdminClient({"bootstrap.servers": broker_bootstrap(up)}).list_topics(timeout=30)


def _subject_of_new_mail(up: Up) -> tuple[object, object]:
    mid, m = message(0)
    with smtplib.SMTP("127.0.0.1", up.smtp_port, timeout=30) as s:
        s.send_message(m, from_addr="alice@sender.example", to_addrs=["jane@demo.example"])
    row = up.wait_messages(1, timeout=90, message_id=mid)[0]
    return row["subject"], row["policy_version"]


def _api(up: Up, method: str, path: str, **kw: object) -> httpx.Response:
    return httpx.request(method, f"{up.api}{path}", headers=up.headers, timeout=30, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("broker", "how"), [("kafka", "sigkill"), ("kafka", "graceful"), ("tansu", "graceful")]
)
def test_operator_state_survives_restarts(broker: str, how: str, tmp_path: Path) -> None:
    """A policy, a retention override and a revoked token, set through the API, are in force
    after a restart — on Tansu too, whose topics die with it (the store's history restores)."""
    data = tmp_path / "mm"
    with mailmeta_up(data, "--broker", broker) as up:
        doc = _api(up, "GET", "/v1/policies/demo").json()["policy"]
        doc["subject"] = "drop"
        r = _api(up, "PUT", "/v1/policies/demo", json={"policy": doc})
        assert r.status_code == 200, r.text
        # A live change reaches the worker within seconds (tests/test_policy.py): wait for it.
        wait_until(lambda: _subject_of_new_mail(up) == (None, 2), 60, "the live policy")
        assert _api(up, "PUT", "/v1/retention/demo", json={"days": 30}).status_code == 200
        r = _api(up, "POST", "/v1/tokens", json={"name": "gone", "customer": "demo",
                                                 "scopes": ["messages:read"]})  # fmt: skip
        assert r.status_code == 201, r.text
        revoked, revoked_id = r.json()["token"], r.json()["id"]
        assert _api(up, "DELETE", f"/v1/tokens/{revoked_id}").status_code in (200, 204)
        if how == "sigkill":
            up.kill_tree()
    with mailmeta_up(data, "--broker", broker) as up2:
        shown = _api(up2, "GET", "/v1/policies/demo").json()
        assert shown["version"] == 2 and shown["policy"]["subject"] == "drop"
        assert shown["config_is_stale"] is True
        listed = subprocess.run(
            [*MAILMETA, "policy", "list", "--api", up2.api],
            env={**os.environ, "MAILMETA_TOKEN": up2.headers["Authorization"][7:]},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "version 2 stays in force" in listed.stdout, listed.stdout + listed.stderr
        assert _subject_of_new_mail(up2) == (None, 2)
        assert _api(up2, "GET", "/v1/retention").json()["retention_days"]["demo"] == 30
        r = httpx.get(f"{up2.api}/v1/messages", params={"customer": "demo"},
                      headers={"Authorization": f"Bearer {revoked}"}, timeout=10)  # fmt: skip
        assert r.status_code == 401


def test_a_second_up_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "mm"
    with mailmeta_up(data):
        res = subprocess.run(
            [*MAILMETA, "up", "--data-dir", str(data), "--smtp-port", "0", "--api-port", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 1
        assert "another mailmeta up (pid" in res.stderr and str(data.resolve()) in res.stderr
