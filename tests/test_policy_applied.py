"""The API says what the redaction workers apply, not only what is published (issue 21.1).

Two real redaction worker processes (on Apache Kafka and on Tansu) report what they apply to the
policy-status topic; the API (as the sink serves it) reads the reports, and
``mailmeta policy set`` waits for them. One worker runs as a host deployed carelessly would:
with an out-of-date customers file (another document under the same version 1) and without the
environment variable that file names for the customer's HMAC key, so it refuses every version
that hashes. Each is flagged, and named by the CLI.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mailmeta.cli import app as cli
from mailmeta.config import Settings, load_customers
from mailmeta.kafka import ensure_topics
from mailmeta.policy import StatusRecordError, decode_status
from tests.api_helpers import ApiServer
from tests.kafka_helpers import Stage, read_to_end, run_stage, wait_until

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

KEY_ENV = "MAILMETA_TEST_APPLIED_KEY"
CUSTOMERS_YAML = f"""\
customers:
  - id: initech
    domains: [initech.example]
    retention_days: 30
    hmac_key_env: {KEY_ENV}
    policy: {{mail_from: keep, rcpt_to: mask, subject: keep}}
"""
# The careless host's file: version 1 is another document (subjects dropped).
OUTDATED_YAML = CUSTOMERS_YAML.replace("subject: keep", "subject: drop")
STALE_S = 8.0
runner = CliRunner()


@pytest.fixture
def setup(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Settings, ApiServer]]:
    config = tmp_path / "customers.yaml"
    config.write_text(CUSTOMERS_YAML)
    s = settings.model_copy(
        update={
            "config": config,
            "policies_topic": f"{settings.raw_topic}.policies",
            "policy_status_every_s": 0.5,
            "policy_status_stale_s": STALE_S,
        }
    )
    ensure_topics(s, 30)
    customers = load_customers(config)
    monkeypatch.delenv(KEY_ENV, raising=False)  # each test says which process has the key
    server = ApiServer(tmp_path, customers=customers)
    server.install_policies(s, customers)
    server.start()
    try:
        yield s, server
    finally:
        server.stop()


def _applied(api: ApiServer) -> dict[str, Any]:
    with api.client(api.operator) as c:
        r = c.get("/v1/policies/initech")
    assert r.status_code == 200, r.text
    return r.json()["applied"]  # type: ignore[no-any-return]


def _set(api: ApiServer, tmp_path: Path, doc: str, *args: str) -> Any:
    path = tmp_path / "policy.yaml"
    path.write_text(doc)
    return runner.invoke(
        cli,
        ["policy", "set", "initech", str(path), "--api", api.url, "--token", api.operator, *args],
    )


def _id(stage: Stage) -> str:
    """The worker's id (host:pid), as it reports it."""
    return f"{os.uname().nodename}:{stage.proc.pid}"


def test_applied_by_workers_lagging_refusing_and_gone(
    setup: tuple[Settings, ApiServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, api = setup
    outdated = tmp_path / "outdated.yaml"
    outdated.write_text(OUTDATED_YAML)
    monkeypatch.setenv(KEY_ENV, "initech-test-hmac-key-0123456789abcdef")
    with run_stage("mailmeta.streams", settings, "Worker]: Ready") as keyed:
        monkeypatch.delenv(KEY_ENV)
        careless = settings.model_copy(update={"config": outdated})
        with run_stage("mailmeta.streams", careless, "Worker]: Ready") as keyless:
            a, b = _id(keyed), _id(keyless)
            # Version 1 is the API's file's document: the careless worker holds another one.
            first = wait_until(
                lambda: (v := _applied(api))["workers"] == 2 and v["applied_by"] == 1 and v,
                timeout=60,
                what="version 1 applied by 1 of 2 workers",
            )
            assert first["version"] == 1
            assert first["not_applied"] == {"different_digest": [b]}
            assert {w["worker"] for w in first["by_worker"]} == {a, b}

            # A change both can apply: the CLI waits and says so.
            res = _set(api, tmp_path, "{mail_from: keep, rcpt_to: keep, subject: drop}\n")
            assert res.exit_code == 0, res.output
            assert "v2: applied by 2 of 2 live redaction workers" in res.output

            # A change that hashes: the worker without the key refuses it (fail closed) and
            # the CLI exits non-zero naming it and why; the other applies it. The API's host
            # has the key (it checks a document as a worker compiles it, keys included).
            monkeypatch.setenv(KEY_ENV, "initech-test-hmac-key-0123456789abcdef")
            res = _set(api, tmp_path, "{mail_from: hmac, rcpt_to: keep}\n", "--wait", "30")
            assert res.exit_code == 1, res.output
            assert "v3 of initech is published but not applied by 1 of 2" in res.output
            assert f"{b}: refused" in res.output and KEY_ENV in res.output
            assert a not in res.output.split("published but not applied")[1]
            view = _applied(api)
            assert (view["version"], view["applied_by"], view["workers"]) == (3, 1, 2)
            assert view["not_applied"] == {"refused": [b]}
            by = {w["worker"]: w for w in view["by_worker"]}
            assert by[a]["state"] == "applied" and by[a]["digest"] == view["digest"]
            assert by[b]["version"] is None and KEY_ENV in by[b]["reason"]

            # A worker that stops answering (paused by PID) drops out after the window.
            os.kill(keyless.proc.pid, signal.SIGSTOP)
            try:
                wait_until(
                    lambda: (v := _applied(api))["workers"] == 1 and v,
                    timeout=STALE_S + 20,
                    what="the paused worker to drop out",
                )
            finally:
                os.kill(keyless.proc.pid, signal.SIGKILL)
                keyless.proc.wait(10)

            # A worker paused just before a change is shown lagging while it is still live.
            os.kill(keyed.proc.pid, signal.SIGSTOP)
            try:
                res = _set(api, tmp_path, "{mail_from: hmac, rcpt_to: keep, subject: drop}\n",
                           "--wait", "1")  # fmt: skip
                assert res.exit_code == 1, res.output
                assert f"{a}: lagging (holds v3)" in res.output
            finally:
                os.kill(keyed.proc.pid, signal.SIGCONT)
            wait_until(
                lambda: (v := _applied(api))["applied_by"] == 1 and v["version"] == 4,
                timeout=30,
                what="the resumed worker to apply version 4",
            )

    # A clean stop withdraws the report: a tombstone under the worker's id, and it is gone.
    last = {
        m.key(): m.value()
        for m in read_to_end(settings.kafka_bootstrap, settings.policy_status_topic)
    }
    assert last[a.encode()] is None
    assert _applied(api)["workers"] == 0


def test_status_records_are_strict() -> None:
    good = (
        b'{"worker":"h:1","region":"default","at":1,"every_s":5.0,"customers":'
        b'{"c":{"version":1,"digest":"' + b"a" * 64 + b'","refused":null}}}'
    )
    status = decode_status(b"h:1", good)
    assert status is not None and status.customers["c"].version == 1
    assert decode_status(b"h:1", None) is None  # a tombstone
    for bad, why in [
        (good.replace(b'"version":1', b'"version":true'), "version"),
        (good.replace(b'"a' + b"a" * 63, b'"A' + b"a" * 63), "digest"),
        (good.replace(b'"at":1', b'"at":1,"policy":{}'), "policy"),
        (good.replace(b'"version":1', b'"version":0'), "version"),
        (b"not json", "record"),
    ]:
        with pytest.raises(StatusRecordError, match=why):
            decode_status(b"h:1", bad)
    with pytest.raises(StatusRecordError, match="key"):
        decode_status(b"other:2", good)
