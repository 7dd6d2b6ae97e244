"""Settings.to_env: the one way a process hands its settings to the processes it starts
(`mailmeta up`'s parts, `--ingest-workers N`, the tests' stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from mailmeta.config import Settings

# A value other than the default for every field: a field that did not survive the trip
# would come back as its default and fail the comparison.
NON_DEFAULT: dict[str, Any] = {
    "config": Path("/etc/mailmeta/customers.yaml"),
    "region": "eu",
    "data_dir": Path("/var/lib/mail meta"),
    "kafka_bootstrap": "k1:9093,k2:9093",
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-256",
    "kafka_sasl_username": "mailmeta",
    "kafka_sasl_password": SecretStr('pa ss"wörd**********'),
    "kafka_sasl_password_file": Path("/run/secrets/kafka"),
    "kafka_ssl_ca_file": Path("/etc/ssl/ca.pem"),
    "kafka_ssl_cert_file": Path("/etc/ssl/cert.pem"),
    "kafka_ssl_key_file": Path("/etc/ssl/key.pem"),
    "kafka_replication_factor": 3,
    "kafka_min_insync_replicas": 2,
    "kafka_single_node": True,
    "raw_topic": "r",
    "redacted_topic": "x",
    "deadletter_topic": "d",
    "policies_topic": "p",
    "policy_status_topic": "ps",
    "api_trusted_proxies": "10.0.0.0/8, ::1",
    "webhook_allow_networks": "10.0.0.0/8, ::1",
    "webhook_retry_horizon_s": 3600.0,
    "webhook_retry_base_s": 0.5,
    "webhook_retry_max_s": 60.0,
    "webhook_timeout_s": 3.0,
    "webhook_max_response_bytes": 1024,
    "webhook_batch_max": 10,
    "webhook_concurrency": 4,
    "webhooks_in_service": True,
    "webhook_metrics_port": 9104,
    "streams_data_dir": Path("/srv/streams"),
    "streams_metrics_port": 9101,
    "sink_metrics_port": 9102,
    "sink_max_wait_ms": 50,
    "partitions": 12,
    "raw_retention_hours": 2,
    "clickhouse_dsn": "http://u:p@ch:8123/db",
    "clickhouse_cluster": "c1",
    "smtp_host": "0.0.0.0",
    "smtp_port": 25,
    "api_host": "::",
    "api_port": 8080,
    "session_timeout_ms": 6000,
    "log_level": "debug",
    "api_auth": False,
    "operator_token_file": Path("/run/token"),
    "api_rate_per_s": 2.5,
    "api_rate_burst": 7,
    "relay_to": "mx.example:25",
    "relay_tls_verify": True,
    "relay_tls_ca_file": "/etc/ssl/relay.pem",
    "relay_networks": "10.0.0.0/8,192.0.2.0/24",
    "smtp_proxy_networks": "10.1.0.0/16",
    "tls_cert": "/etc/ssl/smtp.pem",
    "tls_key": "/etc/ssl/smtp.key",
    "tls_self_signed": True,
    "ingest_workers": 4,
    "ingest_worker_index": 3,
    "ingest_reuse_port": True,
    "ingest_metrics_port": 9100,
    "smtp_max_message_size": 4096,
    "smtp_max_recipients": 100,
    "smtp_timeout": 12.5,
    "smtp_max_errors": 3,
    "smtp_max_connections_per_ip": 5,
    "ingest_spool_after_s": 0.25,
    "ingest_spool_max_bytes": 0,
}


def _other(name: str, default: Any) -> Any:
    """A non-default value for a field added after this table: the simple types only."""
    if isinstance(default, bool):
        return not default
    if isinstance(default, int | float):
        return default + 1
    pytest.fail(f"add a non-default value of the new setting {name!r} to NON_DEFAULT")


def _plain(v: Any) -> Any:
    return v.get_secret_value() if isinstance(v, SecretStr) else v


def _comparable(s: Settings) -> dict[str, Any]:
    return {name: _plain(getattr(s, name)) for name in Settings.model_fields}


def _from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings read the way a child process reads them: from its environment only."""
    import os

    for key in list(os.environ):
        if key.upper().startswith("MAILMETA_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


def test_every_setting_survives_the_trip_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = {
        name: NON_DEFAULT[name] if name in NON_DEFAULT else _other(name, field.default)
        for name, field in Settings.model_fields.items()
    }
    original = Settings(**values)
    same = [
        k for k, v in _comparable(original).items() if v == _plain(Settings.model_fields[k].default)
    ]
    assert not same, f"{same} must differ from their defaults, or the trip proves nothing"
    env = original.to_env()
    assert env["MAILMETA_KAFKA_SASL_PASSWORD"] == 'pa ss"wörd**********'  # revealed, not masked
    assert _comparable(_from_env(env, monkeypatch)) == _comparable(original)


def test_unset_optionals_stay_unset_and_drop_a_stale_inherited_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = Settings(kafka_sasl_password_file=None, operator_token_file=None)
    inherited = {
        "MAILMETA_KAFKA_SASL_PASSWORD_FILE": "/old/secret",
        "MAILMETA_API": "kept",
        "X": "y",
    }
    env = s.to_env(inherited)
    assert "MAILMETA_KAFKA_SASL_PASSWORD_FILE" not in env  # never the text "None"
    assert "None" not in env.values()
    assert env["MAILMETA_API"] == "kept" and env["X"] == "y"  # not settings: left alone
    back = _from_env({k: v for k, v in env.items() if k.startswith("MAILMETA_")}, monkeypatch)
    assert back.kafka_sasl_password_file is None and back.operator_token_file is None


def test_the_redaction_workers_files_default_under_the_data_dir() -> None:
    assert Settings(data_dir=Path("/d")).streams_dir() == Path("/d/streams")
    assert Settings(streams_data_dir=Path("/s")).streams_dir() == Path("/s")
