"""Two sink replicas in one consumer group on the 3-broker Apache Kafka cluster: the group
splits the partitions, a replica that leaves hands its partitions over, and every event is
stored once (rows and hourly stats), whichever replica stored it or how often it was read."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Producer

from mailmeta.config import Settings
from mailmeta.kafka import ensure_topics, producer_config
from mailmeta.schema import encode_event
from mailmeta.sinks import DrainState, SinkConsumer
from mailmeta.store import ClickHouseStore
from tests.kafka_cluster import KafkaCluster
from tests.test_sink import CUSTOMERS, redacted, wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture
def settings(kafka_cluster: KafkaCluster, tmp_path: Path) -> Settings:
    p = f"rep-{uuid.uuid4().hex[:8]}"
    s = Settings(
        config=Path("/nonexistent"),
        data_dir=tmp_path / "data",
        kafka_bootstrap=kafka_cluster.bootstrap,
        raw_topic=f"{p}.raw",
        redacted_topic=f"{p}.redacted",
        deadletter_topic=f"{p}.deadletter",
        policies_topic=f"{p}.policies",
        partitions=4,
        kafka_single_node=False,
    )
    ensure_topics(s, CUSTOMERS.shortest_retention_days)
    return s


@pytest.fixture
def store(settings: Settings) -> Iterator[ClickHouseStore]:
    s = ClickHouseStore(settings.resolved_dsn(), {c.id: c.retention_days for c in CUSTOMERS})
    yield s
    s.close()


def _send(settings: Settings, events: list) -> None:  # type: ignore[type-arg]
    producer = Producer(producer_config(settings))
    for ev in events:
        producer.produce(settings.redacted_topic, encode_event(ev), key=ev.event_id.encode())
    assert producer.flush(30) == 0


def _stats(store: ClickHouseStore) -> int:
    now = datetime.now(UTC)
    rows = store.hourly_stats("order", now - timedelta(days=1), now + timedelta(hours=1))
    return sum(int(r["messages"]) for r in rows)


def test_two_replicas_share_the_group_and_store_each_event_once(
    settings: Settings, store: ClickHouseStore
) -> None:
    group = f"mailmeta-sink-{uuid.uuid4().hex[:6]}"
    a = SinkConsumer(settings, store, DrainState(settings.partitions), group_id=group)
    b = SinkConsumer(settings, store, DrainState(settings.partitions), group_id=group)
    sent: list[object] = []
    a.start()
    b.start()
    try:
        # Until the group has split the partitions between both (a join may come after the
        # first events): every replica stores some.
        def both_stored() -> bool:
            batch = [redacted("order") for _ in range(50)]
            _send(settings, batch)
            sent.extend(batch)
            return a.stats.rows_inserted > 0 and b.stats.rows_inserted > 0

        wait_for(both_stored, 120, "both replicas to store events")
        wait_for(lambda: store.count("order", visible_only=True) >= len(sent), 120, "first")
        assert a.stop(10)  # leaves the group; b takes over its partitions
        second = [redacted("order") for _ in range(400)]
        _send(settings, second)
        _send(settings, second[:100])  # upstream at-least-once: some events arrive twice
        sent.extend(second)
        wait_for(lambda: store.count("order", visible_only=True) >= len(sent), 120, "second")
    finally:
        a.stop(10)
        b.stop(10)
    assert store.count("order", visible_only=True) == len(sent)
    wait_for(lambda: _stats(store) == len(sent), 60, "hourly stats to count each event once")
