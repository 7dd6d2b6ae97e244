"""confluent-kafka's producer bridged to asyncio.

``produce()`` only enqueues, so it is called on the event loop; a background thread serves
delivery reports with a blocking ``poll(0.5)`` (an idle process stays at ~0 CPU) and
resolves one asyncio future per record through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

log = logging.getLogger("mailmeta.ingest.producer")

DEFAULT_DELIVERY_TIMEOUT = 10.0


class DeliveryError(Exception):
    """The broker did not acknowledge a record; ``str()`` is a short, header-free reason."""


def ingest_overrides(delivery_timeout: float) -> dict[str, Any]:
    """The front end's own producer settings, on top of ``mailmeta.kafka.producer_config``."""
    return {
        # Bounds how long an SMTP client waits for its 250/451.
        "message.timeout.ms": int(delivery_timeout * 1000),
        # Reconnect quickly once the broker is back: SMTP clients retry within minutes.
        "reconnect.backoff.max.ms": 2000,
        "client.id": "mailmeta-ingest",
    }


class EventProducer:
    """Sends encoded events and awaits the broker's acknowledgement of each."""

    def __init__(
        self,
        base_config: dict[str, Any],
        topic: str,
        *,
        delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        """``base_config``: ``mailmeta.kafka.producer_config(settings)`` (idempotent, acks=all)."""
        self.topic = topic
        self.delivery_timeout = delivery_timeout
        config = {**base_config, **ingest_overrides(delivery_timeout)}
        config["error_cb"] = self._on_error
        config["logger"] = logging.getLogger("mailmeta.ingest.librdkafka")
        config.update(extra_config or {})
        self._config = config
        self._producer = Producer(config)
        # Set by error_cb on a fatal error (e.g. the broker lost the idempotent producer's
        # sequence state across a restart): the poll thread then replaces the producer.
        self._fatal = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        # Delivery reports collected during one poll(), settled on the loop in one callback:
        # one wake-up of the event loop per poll instead of one per record.
        self._reports: list[tuple[asyncio.Future[None], KafkaError | None]] = []

    def start(self) -> None:
        """Bind to the running loop and start the delivery-report thread."""
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._poll_forever, name="mailmeta-ingest-kafka-poll", daemon=True
        )
        self._thread.start()

    async def warm_up(self, wait: float = 2.0) -> bool:
        """Fetch the topic's metadata once so the first message does not pay for the
        connection; False (and a warning) when the broker or topic is not there yet."""
        try:
            md = await asyncio.to_thread(self._producer.list_topics, self.topic, wait)
        except KafkaException as exc:
            log.warning("kafka not reachable yet: %s", _reason(exc.args[0]))
            return False
        topic = md.topics.get(self.topic)
        if topic is None or topic.error is not None:
            log.warning("topic %s is not available yet", self.topic)
            return False
        return True

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.5)
            except KafkaException as exc:
                if exc.args[0].fatal():
                    log.error("kafka producer hit a fatal error: %s", _reason(exc.args[0]))
                    self._fatal.set()
                else:
                    log.warning("kafka producer poll failed: %s", _reason(exc.args[0]))
            except Exception:  # a failing callback must not end delivery reports for good
                log.exception("kafka producer poll failed")
            if self._fatal.is_set():
                self._replace_producer()
            self._hand_over()

    def _replace_producer(self) -> None:
        """A fatal producer error is final for that producer instance: start a new one (a new
        producer id) and fail what the old one still held, so callers spool or 451 it."""
        self._fatal.clear()
        old, self._producer = self._producer, Producer(self._config)
        log.warning("kafka producer replaced after a fatal error; %d record(s) failed", len(old))
        try:
            old.purge()
        except KafkaException:
            pass
        # Serve the purged records' reports (bounded): each settles its caller's future.
        for _ in range(20):
            try:
                old.poll(0.05)
            except KafkaException:
                pass
            if len(old) == 0:
                break

    def _hand_over(self) -> None:
        reports, self._reports = self._reports, []
        loop = self._loop
        if not reports or loop is None:
            return
        try:
            loop.call_soon_threadsafe(_settle_all, reports)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _on_error(self, err: KafkaError) -> None:
        reason = err.str()
        if reason != self._last_error:  # librdkafka repeats the same error on every retry
            log.warning("kafka: %s", reason)
            self._last_error = reason
        if err.fatal():
            log.error("kafka producer hit a fatal error: %s", reason)
            self._fatal.set()

    def _delivered(self, fut: asyncio.Future[None], err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            self._last_error = None  # the broker is back: log the next outage again
        # Runs inside poll()/flush() on a librdkafka-serving thread; handed over after it.
        self._reports.append((fut, err))

    def queued(self) -> int:
        """Records handed to the producer and not yet acknowledged or failed."""
        return len(self._producer)

    def send(self, records: Sequence[tuple[bytes, bytes]]) -> list[asyncio.Future[None]]:
        """Enqueue ``(key, value)`` records; one future per record settles with the broker's
        acknowledgement (or a :class:`DeliveryError`). Raises DeliveryError if the local
        queue refuses them."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        produce = self._producer.produce
        for key, value in records:
            fut: asyncio.Future[None] = loop.create_future()
            try:
                produce(self.topic, value, key, on_delivery=functools.partial(self._delivered, fut))
            except BufferError:
                _discard(futures)
                raise DeliveryError("producer queue is full") from None
            except KafkaException as exc:
                _discard(futures)
                raise DeliveryError(_reason(exc.args[0])) from None
            futures.append(fut)
        return futures

    async def deliver(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        """Produce ``(key, value)`` records and return once the broker acknowledged all of
        them; raise :class:`DeliveryError` on the first failure or after the timeout."""
        futures = self.send(records)
        # librdkafka times each record out after message.timeout.ms; this guard only covers
        # a poll thread that stopped serving reports.
        _done, pending = await asyncio.wait(futures, timeout=self.delivery_timeout + 5.0)
        if pending:
            _discard(futures)
            raise DeliveryError("timed out waiting for the event store")
        first: BaseException | None = None
        for fut in futures:
            failure = fut.exception()  # read every one: none is left "never retrieved"
            if failure is not None and first is None:
                first = failure
        if first is not None:
            raise first

    def flush(self, timeout: float) -> int:
        """Blocking: wait up to ``timeout`` s for queued records; returns how many remain."""
        return int(self._producer.flush(timeout))

    async def aclose(self, flush_timeout: float = 5.0) -> None:
        """Stop the poll thread, then flush (bounded) off the loop so reports still settle."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 2.0)
        remaining = await asyncio.to_thread(self.flush, flush_timeout)
        self._hand_over()  # reports served by flush()
        if remaining:
            log.warning("%d event(s) not acknowledged by the broker at shutdown", remaining)


def _settle_all(reports: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    for fut, err in reports:
        _settle(fut, err)


def _settle(fut: asyncio.Future[None], err: KafkaError | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(DeliveryError(_reason(err)))


def _discard(futures: list[asyncio.Future[None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()  # mark retrieved: no "exception was never retrieved" noise


def _reason(err: object) -> str:
    text = err.str() if isinstance(err, KafkaError) else str(err)
    # It ends up in an SMTP reply line: printable ASCII, bounded.
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return text[:200] or "unknown error"
