"""Topic definitions: partitions, retention, compaction; creation and checks.

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


def ensure_topics(
    settings: Settings, shortest_retention_days: int, timeout: float = 15.0
) -> list[str]:
    """Create the pipeline's topics with their partitions and retention; warn on longer ones.

    Returns the warnings (also logged) about existing topics that keep data too long.
    """
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
    if settings.policies_topic not in existing:
        # Policies: compacted (each customer's latest is kept forever, no retention), one
        # partition since every redaction worker reads all of it (streams/_policies.py).
        new.append(
            NewTopic(
                settings.policies_topic,
                num_partitions=1,
                replication_factor=-1,
                config={"cleanup.policy": "compact"},
            )
        )
    if new:
        for name, fut in admin.create_topics(new, request_timeout=timeout).items():
            try:
                fut.result(timeout)
                log.info("created topic %s", name)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    return _warn_long_retention(admin, {n: v for n, v in wanted.items() if n in existing}, timeout)


def check_topic_retention(
    settings: Settings, shortest_retention_days: int, timeout: float = 15.0
) -> list[str]:
    """Warnings (also logged) for pipeline topics that keep data longer than promised."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    wanted = topic_retention_ms(settings, shortest_retention_days)
    existing = admin.list_topics(timeout=timeout).topics
    return _warn_long_retention(admin, {n: v for n, v in wanted.items() if n in existing}, timeout)


def _warn_long_retention(admin: AdminClient, wanted: dict[str, int], timeout: float) -> list[str]:
    warnings: list[str] = []
    if not wanted:
        return warnings
    try:
        futures = admin.describe_configs([ConfigResource("TOPIC", n) for n in wanted])
        for res, fut in futures.items():
            configs = fut.result(timeout)
            entry = configs.get("retention.ms")
            cleanup = configs.get("cleanup.policy")
            limit = wanted[res.name]
            if cleanup is not None and cleanup.value and "delete" not in cleanup.value:
                # Compaction alone keeps the latest record per key forever.
                warnings.append(
                    f"topic {res.name} has cleanup.policy={cleanup.value}: records are not "
                    f"deleted by age; set cleanup.policy=delete and retention.ms={limit}"
                )
            if entry is None or entry.value is None:
                # Some brokers (Tansu) list only what was set: the broker default applies,
                # 7 days on Apache Kafka, which may be longer than promised.
                warnings.append(
                    f"topic {res.name} sets no retention.ms (the broker default applies); "
                    f"set retention.ms={limit}"
                )
                continue
            have = int(entry.value)
            if have < 0 or have > limit:
                warnings.append(
                    f"topic {res.name} keeps data for {have} ms, longer than the {limit} ms "
                    "mailmeta promises; lower its retention.ms"
                )
    except Exception as exc:  # a broker without DescribeConfigs must not stop the pipeline
        warnings.append(f"could not check topic retention: {exc}")
    for w in warnings:
        log.warning("%s", w)
    return warnings
