"""Prometheus metrics of a redaction worker (served when MAILMETA_STREAMS_METRICS_PORT is set)."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from prometheus_client import Counter, Gauge, start_http_server

from mailmeta.config import Settings
from mailmeta.kafka import consumer_config

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
    (its Kafka timestamp, which the topic's retention also goes by); 0 when none waits.

    Reads committed offsets and one record per lagging partition; it never joins the group.
    """
    topic = settings.raw_topic
    consumer = Consumer(consumer_config(settings, group_id))
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
        if meta.error is not None:
            raise RuntimeError(f"raw topic {topic}: {meta.error}")
        parts = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        start: dict[int, int] = {}
        for tp in _committed(consumer, parts, timeout):
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
            at = low if tp.offset == OFFSET_INVALID else tp.offset
            if at < low:
                log.error(
                    "raw partition %s: %s events expired before they were redacted",
                    tp.partition, low - at,
                )  # fmt: skip
                at = low
            if at < high:
                start[tp.partition] = at
        if not start:
            return 0.0
        consumer.assign([TopicPartition(topic, p, o) for p, o in start.items()])
        oldest: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        while len(oldest) < len(start) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            p = msg.partition() or 0
            if p not in oldest and (msg.offset() or 0) >= start[p]:
                oldest[p] = msg.timestamp()[1]
                consumer.pause([TopicPartition(topic, p)])
        if len(oldest) < len(start):
            raise TimeoutError(f"could not read the oldest unprocessed records of {topic}")
        return max(0.0, time.time() - min(oldest.values()) / 1000)
    finally:
        consumer.close()


# Answers while a group's coordinator is elected or loads (Kafka: the first group on a
# fresh cluster creates __consumer_offsets).
_COORDINATOR_MOVING = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    }
)


def _committed(consumer: Consumer, parts: list[TopicPartition], timeout: float) -> list[Any]:
    # The group's coordinator may still be moving (or, on Tansu, not yet known): retry.
    deadline = time.monotonic() + timeout
    while True:
        try:
            return list(consumer.committed(parts, timeout=timeout))
        except KafkaException as exc:
            err = exc.args[0]
            if time.monotonic() > deadline or not (
                err.retriable() or err.code() in _COORDINATOR_MOVING
            ):
                raise
            time.sleep(0.2)


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
