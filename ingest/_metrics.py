"""Prometheus metrics of the SMTP front end (module-level; ``serve_metrics`` exposes them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# One increment per DATA transaction, labelled by what we answered.
MESSAGES = Counter(
    "mailmeta_ingest_messages",
    "SMTP messages received, by outcome",
    # accepted | spooled | relayed_delivered | relayed_deferred | relayed_bounced |
    # rejected_bare_newline | deferred_produce_failed | deferred_spool_full
    ["outcome"],
)
RECIPIENTS_REJECTED = Counter(
    "mailmeta_ingest_recipients_rejected",
    "RCPT commands refused, by reason",
    # unknown_domain | malformed | too_many | relay_denied | tls_required | next_hop |
    # other_region (the customer is pinned to another region: 450)
    ["reason"],
)
DSN = Counter(
    "mailmeta_ingest_dsn",
    "Delivery status notifications to bounce addresses, by outcome",
    # status_recorded | unusable
    ["outcome"],
)
EVENTS_PRODUCED = Counter(
    "mailmeta_ingest_events_produced",
    "Events acknowledged by the broker",
)
PRODUCE_LATENCY = Histogram(
    "mailmeta_ingest_produce_seconds",
    "Time from handing a message's events to the producer until the broker acknowledged all",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CONNECTIONS = Counter(
    "mailmeta_ingest_connections",
    "SMTP connections, by outcome",
    # accepted | refused_per_ip | timeout | too_many_errors
    ["outcome"],
)
ACTIVE_CONNECTIONS = Gauge("mailmeta_ingest_active_connections", "Open SMTP connections")
TLS_SESSIONS = Counter(
    "mailmeta_ingest_tls_sessions",
    "Completed STARTTLS handshakes, by protocol version and cipher",
    ["version", "cipher"],
)
AUTH = Counter("mailmeta_ingest_auth", "SMTP AUTH attempts, by result", ["result"])
SPOOL_DEPTH = Gauge(
    "mailmeta_ingest_spool_records", "Events in the durable spool, not yet replayed"
)
SPOOL_BYTES = Gauge("mailmeta_ingest_spool_bytes", "Bytes of the durable spool on disk")
SPOOL_REPLAYED = Counter("mailmeta_ingest_spool_replayed", "Spooled events replayed to the broker")
SPOOL_HELD = Counter(
    "mailmeta_ingest_spool_held",
    "Spooled events not replayed: their customer was pinned to another region meanwhile "
    "(kept in held.<region>.log for that region)",
)
RELAY_LATENCY = Histogram(
    "mailmeta_ingest_relay_seconds",
    "Time to hand a message to the next hop and get its verdict",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
METADATA_LOST = Counter(
    "mailmeta_ingest_metadata_lost",
    "Relayed messages whose event could be neither produced nor spooled (page someone)",
)

EVENTS_SCRUBBED = Counter(
    "mailmeta_ingest_events_scrubbed",
    "Events whose text held characters no encoder takes (replaced by U+FFFD before encoding)",
)


def serve_metrics(port: int, host: str) -> None:
    """Expose /metrics on ``host:port`` (a daemon thread of prometheus_client)."""
    start_http_server(port, addr=host)
