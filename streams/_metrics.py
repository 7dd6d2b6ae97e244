"""Prometheus metrics of a redaction worker (served when MAILMETA_STREAMS_METRICS_PORT is set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

REDACTED = Counter("mailmeta_redaction_events", "Events redacted and produced")
DEAD_LETTERS = Counter(
    "mailmeta_redaction_dead_letters",
    "Records sent to the dead-letter topic, by reason (schema: not a valid event; "
    "redaction: no policy in force could apply)",
    ["reason"],
)
POLICY_VERSION = Gauge(
    "mailmeta_redaction_policy_version", "Policy version in force, per customer", ["customer"]
)


def serve(port: int, host: str) -> None:
    start_http_server(port, addr=host)
