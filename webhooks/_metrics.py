"""The webhook stage's Prometheus metrics (default registry: served by the sink service's
metrics port when the stage runs inside it, or on MAILMETA_WEBHOOK_METRICS_PORT alone)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DELIVERED = Counter(
    "mailmeta_webhook_events_delivered", "Events delivered (2xx), by endpoint", ["endpoint"]
)
FAILED = Counter(
    "mailmeta_webhook_events_failed",
    "Events moved to the failure log past the retry horizon, by endpoint",
    ["endpoint"],
)
ATTEMPTS = Counter(
    "mailmeta_webhook_attempts",
    "POSTs by endpoint and outcome (2xx, 4xx, 5xx, 3xx, error)",
    ["endpoint", "outcome"],
)
LATENCY = Histogram(
    "mailmeta_webhook_request_seconds",
    "Time of one POST, answer included",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PENDING_AGE = Gauge(
    "mailmeta_webhook_oldest_pending_seconds",
    "Age of the oldest event queued and not yet settled, by endpoint (at the last scan)",
    ["endpoint"],
)
