"""Output records through librdkafka (confluent-kafka) instead of faust's aiokafka producer.

aiokafka builds each record batch in Python (~10+ µs a record); librdkafka does it in C
(~1-2 µs). faust keeps the consumer group, offsets and commits: :meth:`Sender.send_batch`
returns a future that resolves once the broker acknowledged *every* record of the batch,
and the batch's offsets are acked only then (at-least-once).

Delivery reports are served by one thread blocked in ``poll``: no busy loop when idle, and
the event loop never stalls in ``flush``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

# (topic, key, value, partition or None for the partitioner, headers or None)
OutRecord = tuple[str, bytes | None, bytes, int | None, Any]


class Sender:
    def __init__(self, config: dict[str, Any]) -> None:
        """``config``: a producer config from ``mailmeta.kafka.producer_config``."""
        self._producer = Producer(config)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="mailmeta-sender", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        poll = self._producer.poll
        while not self._stop.is_set():
            poll(0.2)  # delivery callbacks run here, on this thread only

    def stop(self, timeout: float = 10.0) -> int:
        """Deliver what is queued (up to ``timeout``); the number of records left undelivered."""
        left = self._producer.flush(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        return int(left)

    async def send_batch(self, records: Sequence[OutRecord]) -> asyncio.Future[None]:
        """Queue ``records`` (in order); the future resolves when all are acknowledged,
        or fails with the first delivery error."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not records:
            done.set_result(None)
            return done
        # Only the poll thread touches ``state`` after this point.
        state: list[Any] = [len(records), None]  # remaining, first error

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None and state[1] is None:
                state[1] = err
            state[0] -= 1
            if state[0] == 0:
                loop.call_soon_threadsafe(_resolve, done, state[1])

        produce = self._producer.produce
        for topic, key, value, partition, headers in records:
            while True:
                try:
                    if partition is None:
                        produce(topic, value, key, headers=headers, on_delivery=on_delivery)
                    else:
                        produce(
                            topic,
                            value,
                            key,
                            partition=partition,
                            headers=headers,
                            on_delivery=on_delivery,
                        )
                    break
                except BufferError:
                    # Queue full: let the poll thread serve deliveries meanwhile.
                    await asyncio.sleep(0.005)
        return done


def _resolve(fut: asyncio.Future[None], err: KafkaError | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(KafkaException(err))
