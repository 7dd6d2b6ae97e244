"""Topic retention: set when mailmeta creates its topics, warned about when longer.

Runs on both bundled brokers: Tansu lists only the configs a topic sets, noida-db lists
defaults too; both answer DescribeConfigs.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from mailmeta.config import Settings
from mailmeta.kafka import check_topic_retention, ensure_topics
from mailmeta.local.brokers import LocalBroker

HOUR_MS, DAY_MS = 3_600_000, 86_400_000
pytestmark = pytest.mark.parametrize(
    "broker", ["tansu", pytest.param("noida", marks=pytest.mark.noida)], indirect=True
)


def fresh(broker: LocalBroker, tmp_path: Path) -> Settings:
    p = f"top-{uuid.uuid4().hex[:8]}"
    return Settings(
        data_dir=tmp_path,
        kafka_bootstrap=broker.bootstrap,
        raw_topic=f"{p}.raw",
        redacted_topic=f"{p}.redacted",
        deadletter_topic=f"{p}.deadletter",
        policies_topic=f"{p}.policies",
        raw_retention_hours=3,
        partitions=2,
    )


def retention_of(admin: AdminClient, topic: str) -> int | None:
    [fut] = admin.describe_configs([ConfigResource("TOPIC", topic)]).values()
    entry = fut.result(10).get("retention.ms")
    return None if entry is None or entry.value is None else int(entry.value)


def test_created_topics_carry_their_retention(broker: LocalBroker, tmp_path: Path) -> None:
    s = fresh(broker, tmp_path)
    assert ensure_topics(s, shortest_retention_days=3) == []
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    assert retention_of(admin, s.raw_topic) == 3 * HOUR_MS
    assert retention_of(admin, s.redacted_topic) == 3 * DAY_MS  # <= shortest customer's
    assert retention_of(admin, s.deadletter_topic) == 3 * DAY_MS
    meta = admin.list_topics(timeout=10).topics
    assert len(meta[s.redacted_topic].partitions) == 2
    # A second start finds them as wanted: nothing to say.
    assert ensure_topics(s, shortest_retention_days=3) == []
    # A customer's retention drops to 1 day: the redacted topic now keeps data too long.
    warnings = check_topic_retention(s, 1)
    assert any(s.redacted_topic in w and str(DAY_MS) in w for w in warnings), warnings


def test_existing_longer_topics_are_warned_about(
    broker: LocalBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = fresh(broker, tmp_path)
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    made = admin.create_topics(
        [
            NewTopic(s.raw_topic, 2, -1, config={"retention.ms": str(30 * DAY_MS)}),
            NewTopic(s.redacted_topic, 2, -1, config={"retention.ms": str(DAY_MS)}),
        ]
    )
    for fut in made.values():
        fut.result(10)
    with caplog.at_level(logging.WARNING, logger="mailmeta.kafka"):
        warnings = ensure_topics(s, shortest_retention_days=60)
    assert len(warnings) == 1, warnings
    assert s.raw_topic in warnings[0] and "longer than" in warnings[0]
    assert warnings[0] in caplog.text
    # Topics mailmeta did not find were still created with theirs.
    assert retention_of(admin, s.deadletter_topic) == 7 * DAY_MS
