"""Sending the sink's dead letters, acknowledged before the batch they belong to is committed.

The records are built by ``schema.DeadLetter`` (the redaction worker's too); the worker sends
its dead letters with its redacted output through one asynchronous producer, the sink with
this synchronous one, from its writer thread.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from mailmeta.config import Settings
from mailmeta.kafka import producer_config
from mailmeta.schema import DeadLetter


class DeadLetterSender:
    """Produces dead letters to settings.deadletter_topic; ``send`` returns once all are
    acknowledged, else raises KafkaException (the caller retries the lot)."""

    def __init__(self, settings: Settings, logger: logging.Logger) -> None:
        self.topic = settings.deadletter_topic
        self._producer = Producer(producer_config(settings, logger=logger))

    def send(self, dead: list[DeadLetter]) -> None:
        failures: list[str] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        for letter in dead:
            # Not the record's key, value or headers: any may hold what the record held.
            self._producer.produce(
                self.topic,
                value=letter.value(),
                key=letter.key(),
                headers=letter.headers(),
                on_delivery=delivered,
            )
        left = self._producer.flush(10.0)
        if left or failures:
            # Resending all of them may duplicate some dead letters: at-least-once, as usual.
            raise KafkaException(f"{left} undelivered, errors: {failures[:3]}")

    def close(self) -> None:
        # Dead letters still queued belong to an uncommitted batch: they will be resent.
        if self._producer.flush(2.0):
            self._producer.purge()
        self._producer.close()
