"""Prometheus metrics of the SMTP front end (module-level; exposing them is the caller's job)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

# One increment per DATA transaction, labelled by what we answered.
MESSAGES = Counter(
    "mailmeta_ingest_messages",
    "SMTP messages received, by outcome",
    ["outcome"],  # accepted | rejected_bare_newline | deferred_produce_failed | spooled
)
RECIPIENTS_REJECTED = Counter(
    "mailmeta_ingest_recipients_rejected",
    "RCPT commands refused, by reason",
    ["reason"],  # unknown_domain | malformed | too_many | shutting_down
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
