"""Prometheus metrics of a redaction worker (served when MAILMETA_STREAMS_METRICS_PORT is set)."""

from __future__ import annotations

import logging

from confluent_kafka import Consumer
from prometheus_client import Counter, Gauge, start_http_server

from mailmeta.config import Settings
from mailmeta.kafka import consumer_config, group_backlog

log = logging.getLogger("mailmeta.streams")

REDACTED = Counter("mailmeta_redaction_events", "Events redacted and produced")
DEAD_LETTERS = Counter(
    "mailmeta_redaction_dead_letters",
    "Records sent to the dead-letter topic, by reason (schema: not a valid event; "
    "redaction: no policy in force could apply; region: a customer of another region)",
    ["reason"],
)
POLICY_VERSION = Gauge(
    "mailmeta_redaction_policy_version", "Policy version in force, per customer", ["customer"]
)
POLICY_CONFLICTS = Counter(
    "mailmeta_streams_policy_conflicts",
    "Policy records naming a version this worker holds with another document (an alarm: "
    "the version held stays in force)",
    ["customer"],
)
RAW_BACKLOG_AGE = Gauge(
    "mailmeta_streams_raw_backlog_age_seconds",
    "Age of the oldest raw event the redaction workers have not processed (0: none waiting). "
    "The raw topic deletes events older than its retention, processed or not.",
)
# Warn at this share of the raw topic's retention: time to act before acknowledged mail
# expires unredacted (README: raise the retention, or refuse mail).
WARN_FRACTION = 0.5
CHECK_EVERY_S = 30.0


def serve(port: int, host: str) -> None:
    start_http_server(port, addr=host)


def raw_backlog_age(settings: Settings, group_id: str, timeout: float = 10.0) -> float:
    """Seconds since the oldest raw record past ``group_id``'s committed offsets was written
    (its Kafka timestamp, which the topic's retention also goes by); 0 when none waits."""
    consumer = Consumer(consumer_config(settings, group_id))
    try:
        backlog = group_backlog(consumer, settings.raw_topic, timeout)
    finally:
        consumer.close()
    for partition, n in backlog.expired.items():
        log.error("raw partition %s: %s events expired before they were redacted", partition, n)
    return backlog.oldest_age_s


class BacklogMonitor:
    """Sets RAW_BACKLOG_AGE and warns when the backlog nears the raw topic's retention."""

    def __init__(self, settings: Settings, group_id: str) -> None:
        self.settings = settings
        self.group_id = group_id

    def check(self) -> float:
        age = raw_backlog_age(self.settings, self.group_id)
        RAW_BACKLOG_AGE.set(age)
        retention_s = self.settings.raw_retention_hours * 3600
        if age >= WARN_FRACTION * retention_s:
            log.warning(
                "the oldest unredacted raw event is %.0f s old, %.0f%% of the raw topic's "
                "retention (%s h): events older than that are deleted unprocessed, although "
                "their mail was acknowledged. Start more redaction workers, raise "
                "MAILMETA_RAW_RETENTION_HOURS, or have ingest refuse mail (README).",
                age, 100 * age / retention_s, self.settings.raw_retention_hours,
            )  # fmt: skip
        return age
