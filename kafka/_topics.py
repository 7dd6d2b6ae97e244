"""Topic definitions: partitions, retention, compaction; creation and checks.

Only standard Kafka APIs: the same code runs on Apache Kafka, Redpanda or a managed Kafka.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from mailmeta.config import Settings
from mailmeta.kafka._clients import admin as admin_client

log = logging.getLogger("mailmeta.kafka")

_DAY_MS = 86_400_000


def topic_retention_ms(settings: Settings, shortest_retention_days: int) -> dict[str, int]:
    """Raw: hours (unredacted data); redacted: at most the shortest customer retention."""
    return {
        settings.raw_topic: settings.raw_retention_hours * 3_600_000,
        settings.redacted_topic: min(7, shortest_retention_days) * _DAY_MS,
        settings.deadletter_topic: min(7, shortest_retention_days) * _DAY_MS,
    }


class TopicError(RuntimeError):
    """An existing topic contradicts what mailmeta needs; the message says what and how."""


def replication(settings: Settings, brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) for topics mailmeta creates."""
    rf = settings.kafka_replication_factor or min(3, brokers)
    isr = settings.kafka_min_insync_replicas or (2 if rf >= 3 else 1)
    if rf > brokers:
        raise TopicError(
            f"MAILMETA_KAFKA_REPLICATION_FACTOR={rf} but the cluster has {brokers} broker(s)"
        )
    if isr > rf:
        raise TopicError(f"MAILMETA_KAFKA_MIN_INSYNC_REPLICAS={isr} exceeds replication {rf}")
    if rf == 1 and not settings.kafka_single_node:
        raise TopicError(
            f"topics would have replication factor 1 ({brokers} broker(s)): one lost disk "
            "loses acknowledged mail. Use a cluster of 3, or set MAILMETA_KAFKA_SINGLE_NODE=true "
            "if this is meant to be a single-node setup"
        )
    return rf, isr


def ensure_topics(
    settings: Settings, shortest_retention_days: int, timeout: float = 15.0
) -> list[str]:
    """Create the pipeline's topics (partitions, replication, retention, compaction) or check
    the existing ones: idempotent. Raises TopicError when an existing topic contradicts what
    mailmeta needs; returns the warnings (also logged) about ones that keep data too long.
    """
    admin = admin_client(settings)
    wanted = topic_retention_ms(settings, shortest_retention_days)
    md = admin.list_topics(timeout=timeout)
    existing = md.topics
    rf, isr = replication(settings, len(md.brokers))
    safety = {"min.insync.replicas": str(isr)}
    new = [
        NewTopic(
            name,
            num_partitions=settings.partitions,
            replication_factor=rf,
            config={"retention.ms": str(ms), **safety},
        )
        for name, ms in wanted.items()
        if name not in existing
    ]
    if settings.policies_topic not in existing:
        # Policies: compacted (each customer's latest is kept forever, no retention), one
        # partition since every redaction worker reads all of it (policy/_log.py).
        new.append(
            NewTopic(
                settings.policies_topic,
                num_partitions=1,
                replication_factor=rf,
                config={"cleanup.policy": "compact", **safety},
            )
        )
    if settings.policy_status_topic not in existing:
        # What each redaction worker applies (policy/_applied.py): the latest record per
        # worker is what counts, and readers read only the last minutes of it. Compacted and
        # deleted after a day, in hourly segments (only closed segments are cleaned), so
        # records of workers long gone do not pile up.
        new.append(
            NewTopic(
                settings.policy_status_topic,
                num_partitions=1,
                replication_factor=rf,
                config={
                    "cleanup.policy": "compact,delete",
                    "retention.ms": str(_DAY_MS),
                    "segment.ms": str(3_600_000),
                    **safety,
                },
            )
        )
    if new:
        for name, fut in admin.create_topics(new, request_timeout=timeout).items():
            try:
                fut.result(timeout)
                log.info("created topic %s (replication %s, min.insync.replicas %s)", name, rf, isr)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    # New topics, and existing ones on a broker that just (re)started, serve clients only once
    # each partition has a leader; a consumer group that joins earlier can be assigned without
    # them (seen with faust on a restarted Kafka) and never consume them.
    _wait_for_leaders(
        admin, [*wanted, settings.policies_topic, settings.policy_status_topic], timeout
    )
    _check_existing(settings, admin, md, timeout)
    return _warn_long_retention(admin, {n: v for n, v in wanted.items() if n in existing}, timeout)


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout: float) -> None:
    """A created topic is usable once every partition has a leader in the metadata: Kafka
    propagates new topics to its brokers' caches asynchronously (a client asking at once
    gets UNKNOWN_PARTITION)."""
    deadline = time.monotonic() + timeout
    while True:
        topics = admin.list_topics(timeout=timeout).topics
        ready = all(
            n in topics
            and topics[n].error is None
            and topics[n].partitions
            and all(p.leader >= 0 for p in topics[n].partitions.values())
            for n in names
        )
        if ready or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def _check_existing(settings: Settings, admin: AdminClient, md: Any, timeout: float) -> None:
    """Refuse topics that would break a promise: a non-compacted policies topic (a policy
    would expire and an older one come back), replication 1 outside a single-node setup."""
    problems = []
    for name in (settings.raw_topic, settings.redacted_topic, settings.policies_topic):
        topic = md.topics.get(name)
        if topic is None or not topic.partitions:
            continue
        replicas = min(len(p.replicas) for p in topic.partitions.values())
        if replicas == 1 and not settings.kafka_single_node:
            problems.append(f"topic {name} has replication factor 1")
    policies = md.topics.get(settings.policies_topic)
    if policies is not None:
        try:
            [fut] = admin.describe_configs(
                [ConfigResource("TOPIC", settings.policies_topic)]
            ).values()
            cleanup = fut.result(timeout).get("cleanup.policy")
        except KafkaException:
            cleanup = None  # a broker without DescribeConfigs: nothing to check
        if cleanup is not None and cleanup.value and "compact" not in cleanup.value:
            problems.append(
                f"topic {settings.policies_topic} has cleanup.policy={cleanup.value}; it must "
                "be compacted (cleanup.policy=compact), or policies expire"
            )
    if problems:
        raise TopicError("; ".join(problems))


def check_topic_retention(
    settings: Settings, shortest_retention_days: int, timeout: float = 15.0
) -> list[str]:
    """Warnings (also logged) for pipeline topics that keep data longer than promised."""
    admin = admin_client(settings)
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
