"""How far a consumer group is behind on a topic, read from outside the group: its committed
offsets against the topic's offsets, and the Kafka timestamp of the oldest record it has not
consumed. It never joins the group, so it answers while the group's members are stuck,
rebalancing or all stopped (raw backlog of the redaction workers, lag of the sinks)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition

# Answers while a group's coordinator is elected or loads (Kafka: the first group on a
# fresh cluster creates __consumer_offsets).
_COORDINATOR_MOVING = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    }
)


@dataclass
class Backlog:
    lag: dict[int, int] = field(default_factory=dict)  # records past the committed offset
    expired: dict[int, int] = field(default_factory=dict)  # deleted by retention unconsumed
    oldest_age_s: float = 0.0  # age of the oldest record not consumed yet; 0: none waits


def group_backlog(consumer: Consumer, topic: str, timeout: float = 10.0) -> Backlog:
    """The backlog of ``consumer``'s group (its ``group.id``) on ``topic``. Reads one record
    per lagging partition; leaves ``consumer`` unassigned, ready for the next call."""
    meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
    if meta.error is not None:
        raise RuntimeError(f"topic {topic}: {meta.error}")
    parts = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
    backlog = Backlog()
    start: dict[int, int] = {}
    for tp in _committed(consumer, parts, timeout):
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
        at = low if tp.offset == OFFSET_INVALID else tp.offset
        if at < low:
            backlog.expired[tp.partition] = low - at
            at = low
        backlog.lag[tp.partition] = max(0, high - at)
        if at < high:
            start[tp.partition] = at
    backlog.oldest_age_s = _oldest_age(consumer, topic, start, timeout)
    return backlog


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


def _oldest_age(consumer: Consumer, topic: str, start: dict[int, int], timeout: float) -> float:
    """Reads the record at each lagging partition's committed offset for its timestamp."""
    if not start:
        return 0.0
    assigned = [TopicPartition(topic, p, o) for p, o in start.items()]
    consumer.assign(assigned)
    oldest: dict[int, int] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(oldest) < len(start) and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            p = msg.partition() or 0
            if p not in oldest and (msg.offset() or 0) >= start[p]:
                oldest[p] = msg.timestamp()[1]
                consumer.pause([TopicPartition(topic, p)])
    finally:
        # A pause outlives the assignment in librdkafka: undo it for the next call.
        consumer.resume(assigned)
        consumer.unassign()
    if len(oldest) < len(start):
        raise TimeoutError(f"could not read the oldest unconsumed records of {topic}")
    return max(0.0, time.time() - min(oldest.values()) / 1000)
