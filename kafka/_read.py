"""Reading one partition to its end without joining a group: the compacted state topics
(policies, policy status) are read whole or from a point in time by whoever needs them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from mailmeta.config import Settings
from mailmeta.kafka._clients import consumer_config


def read_partition(
    settings: Settings,
    topic: str,
    partition: int,
    *,
    since_ms: int | None = None,
    timeout: float = 10.0,
    purpose: str = "reader",
) -> Iterator[Message]:
    """Every record of ``topic``/``partition`` up to its high watermark at the call: from
    the start, or from the first record at or after ``since_ms`` (all of it on a broker
    without ListOffsets by time). Raises TimeoutError when not read within ``timeout``."""
    # A throwaway group id: the consumer is assigned and never commits, so it never joins.
    consumer = Consumer(
        consumer_config(
            settings, f"mailmeta-{purpose}-{uuid.uuid4().hex}", **{"enable.partition.eof": True}
        )
    )
    try:
        tp = TopicPartition(topic, partition)
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout, cached=False)
        start = low
        if since_ms is not None:
            try:
                [found] = consumer.offsets_for_times(
                    [TopicPartition(topic, partition, since_ms)], timeout=timeout
                )
                start = high if found.offset < 0 else max(low, found.offset)
            except KafkaException:
                pass
        if start >= high:
            return
        consumer.assign([TopicPartition(topic, partition, start)])
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} not read within {timeout}s")
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            offset = msg.offset() or 0
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(err)
                if offset >= high:
                    return
                continue
            yield msg
            if offset + 1 >= high:
                return
    finally:
        consumer.close()
