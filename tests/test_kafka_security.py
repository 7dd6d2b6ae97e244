"""Kafka security: the whole pipeline through a SASL_PLAINTEXT + SCRAM-SHA-512 listener of a
real Apache Kafka, and a clear refusal at start with wrong credentials."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from mailmeta.local.apache_kafka import KafkaNode
from mailmeta.local.process import free_port
from tests.kafka_cluster import SCRAM_PASSWORD, SCRAM_USER
from tests.kafka_helpers import consume, wait_until
from tests.up_helpers import MAILMETA, Stream, mailmeta_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.kafka]


def _env(tmp_path: Path, password: str) -> dict[str, str]:
    secret = tmp_path / "kafka-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    p = f"s{uuid.uuid4().hex[:8]}"
    return {
        "MAILMETA_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "MAILMETA_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "MAILMETA_KAFKA_SASL_USERNAME": SCRAM_USER,
        "MAILMETA_KAFKA_SASL_PASSWORD_FILE": str(secret),
        "MAILMETA_RAW_TOPIC": f"{p}.raw",
        "MAILMETA_REDACTED_TOPIC": f"{p}.redacted",
        "MAILMETA_DEADLETTER_TOPIC": f"{p}.deadletter",
        "MAILMETA_POLICIES_TOPIC": f"{p}.policies",
    }


def test_the_pipeline_runs_over_scram(apache_kafka: KafkaNode, tmp_path: Path) -> None:
    assert apache_kafka.sasl_bootstrap is not None
    env = _env(tmp_path, SCRAM_PASSWORD)
    with mailmeta_up(
        tmp_path / "mm", "--kafka-bootstrap", apache_kafka.sasl_bootstrap, env=env
    ) as up:
        with Stream(up.smtp_port, limit=3) as stream:
            stream.wait_done(120)
        assert len(stream.acked) == 3, stream.refused
        rows = up.wait_messages(3, timeout=120)
        assert {r["message_id"] for r in rows} >= set(stream.acked)
    assert SCRAM_PASSWORD not in up.output


def test_ingest_workers_get_the_password_itself_not_its_mask(
    apache_kafka: KafkaNode, tmp_path: Path
) -> None:
    """`--ingest-workers 2` with the password in MAILMETA_KAFKA_SASL_PASSWORD: the parent
    hands it to each front end process (once as `**********`, and no worker connected)."""
    assert apache_kafka.sasl_bootstrap is not None
    env = _env(tmp_path, SCRAM_PASSWORD)
    del env["MAILMETA_KAFKA_SASL_PASSWORD_FILE"]
    env["MAILMETA_KAFKA_SASL_PASSWORD"] = SCRAM_PASSWORD
    with mailmeta_up(
        tmp_path / "mm",
        "--kafka-bootstrap", apache_kafka.sasl_bootstrap,
        "--ingest-workers", "2",
        env=env,
    ) as up:  # fmt: skip
        log = up.data_dir / "logs" / "ingest.log"
        wait_until(lambda: "2 workers, pids" in log.read_text(), 30, "both front end workers")
        # One connection per mail: the kernel spreads them over both workers' sockets.
        with Stream(up.smtp_port, limit=8) as stream:
            stream.wait_done(120)
        assert len(stream.acked) == 8, stream.refused
        rows = up.wait_messages(8, timeout=120)
        assert {r["message_id"] for r in rows} >= set(stream.acked)
        raw = consume(
            apache_kafka.sasl_bootstrap, env["MAILMETA_RAW_TOPIC"], 8, timeout=60,
            **{"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-512",
               "sasl.username": SCRAM_USER, "sasl.password": SCRAM_PASSWORD},
        )  # fmt: skip
        assert len(raw) >= 8  # the mails went through Kafka's SCRAM listener
    assert SCRAM_PASSWORD not in up.output


def test_wrong_credentials_fail_at_start_naming_the_user(
    apache_kafka: KafkaNode, tmp_path: Path
) -> None:
    assert apache_kafka.sasl_bootstrap is not None
    wrong = f"not-the-password-{uuid.uuid4().hex}"
    res = subprocess.run(
        [*MAILMETA, "up", "--kafka-bootstrap", apache_kafka.sasl_bootstrap,
         "--data-dir", str(tmp_path / "mm"), "--smtp-port", str(free_port()),
         "--api-port", str(free_port())],
        env={**os.environ, **_env(tmp_path, wrong)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"refused the credentials of MAILMETA_KAFKA_SASL_USERNAME='{SCRAM_USER}'" in res.stderr
    assert wrong not in res.stdout + res.stderr
    assert not (tmp_path / "mm" / "logs" / "sink.log").exists()  # no stage was started
