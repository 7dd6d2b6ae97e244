"""Kafka plumbing shared by every stage: client settings and topic creation.

Only standard Kafka APIs: the same code runs on Apache Kafka, Redpanda or a managed Kafka.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from mailmeta.config import Settings

log = logging.getLogger("mailmeta.kafka")

_DAY_MS = 86_400_000


def topic_retention_ms(settings: Settings, shortest_retention_days: int) -> dict[str, int]:
    """Raw: hours (unredacted data); redacted: at most the shortest customer retention."""
    return {
        settings.raw_topic: settings.raw_retention_hours * 3_600_000,
        settings.redacted_topic: min(7, shortest_retention_days) * _DAY_MS,
        settings.deadletter_topic: min(7, shortest_retention_days) * _DAY_MS,
    }


def ensure_topics(settings: Settings, shortest_retention_days: int, timeout: float = 15.0) -> None:
    """Create the pipeline's topics with their partitions and retention; warn on longer ones."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    wanted = topic_retention_ms(settings, shortest_retention_days)
    existing = admin.list_topics(timeout=timeout).topics
    new = [
        NewTopic(
            name,
            num_partitions=settings.partitions,
            replication_factor=-1,
            config={"retention.ms": str(ms)},
        )
        for name, ms in wanted.items()
        if name not in existing
    ]
    if new:
        for name, fut in admin.create_topics(new, request_timeout=timeout).items():
            try:
                fut.result(timeout)
                log.info("created topic %s", name)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    _warn_long_retention(admin, {n: ms for n, ms in wanted.items() if n in existing}, timeout)


def _warn_long_retention(admin: AdminClient, wanted: dict[str, int], timeout: float) -> None:
    if not wanted:
        return
    try:
        futures = admin.describe_configs([ConfigResource("TOPIC", n) for n in wanted])
        for res, fut in futures.items():
            entry = fut.result(timeout).get("retention.ms")
            if entry is None or entry.value is None:
                continue
            have = int(entry.value)
            if have < 0 or have > wanted[res.name]:
                log.warning(
                    "topic %s keeps data for %s ms, longer than the %s ms mailmeta promises; "
                    "lower its retention.ms",
                    res.name,
                    have,
                    wanted[res.name],
                )
    except Exception as exc:  # a broker without DescribeConfigs must not stop the pipeline
        log.warning("could not check topic retention: %s", exc)
