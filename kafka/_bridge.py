"""The one bridge from confluent-kafka's producer to asyncio.

``produce()`` only enqueues, so it is called on the event loop. One thread per producer
serves delivery reports with a blocking ``poll`` (an idle process stays at ~0 CPU) and hands
what one poll served to the loop in a single ``call_soon_threadsafe``: one wake-up of the
loop per poll, not per record. librdkafka builds record batches in C (~1-2 µs a record,
against ~10+ µs for aiokafka's Python producer).

Two ways to wait: :meth:`AsyncProducer.send` gives one future per record (the SMTP front end
answers each message on its own records), :meth:`AsyncProducer.send_batch` one future for a
whole batch (the redaction worker acks a batch's offsets once all its output is stored).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

# (topic, key, value, partition or None for the partitioner, headers or None)
OutRecord = tuple[str, bytes | None, bytes, int | None, Any]
# A delivery report waiting for the loop: the future and its error (None: acknowledged).
_Report = tuple[asyncio.Future[None], KafkaError | None]

POLL_TIMEOUT = 0.5  # poll() returns as soon as reports arrive: this only bounds stop()


class AsyncProducer:
    """A confluent-kafka Producer whose delivery reports settle asyncio futures.

    ``error`` turns a failed delivery report into the exception its future holds. A fatal
    producer error (e.g. the broker lost the idempotent producer's sequence state across a
    restart) is final for that producer instance: the poll thread replaces it and fails what
    the old one still held, so callers retry or spool those records.
    """

    def __init__(
        self,
        config: dict[str, Any],
        *,
        name: str,
        error: Callable[[KafkaError], BaseException] = KafkaException,
    ) -> None:
        """``config``: from ``mailmeta.kafka.producer_config``; ``name`` names the logger
        (``mailmeta.<name>.producer``) and the poll thread."""
        self.name = name
        self._error = error
        self._log = logging.getLogger(f"mailmeta.{name}.producer")
        self._config = {**config, "error_cb": self._on_error}
        self._producer = Producer(self._config)
        self._fatal = threading.Event()  # set by error_cb; the poll thread acts on it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_error: str | None = None
        # Reports served by the current poll(), handed to the loop after it.
        self._reports: list[_Report] = []

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind to the running loop and start the delivery-report thread."""
        self._loop = asyncio.get_running_loop()
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._poll_forever, name=f"mailmeta-{self.name}-kafka-poll", daemon=True
        )
        self._thread.start()

    async def warm_up(self, topic: str, wait: float = 2.0) -> bool:
        """Fetch ``topic``'s metadata once so the first record does not pay for the
        connection; False (and a warning) when the broker or topic is not there yet."""
        try:
            md = await asyncio.to_thread(self._producer.list_topics, topic, wait)
        except KafkaException as exc:
            self._log.warning("kafka not reachable yet: %s", _text(exc.args[0]))
            return False
        found = md.topics.get(topic)
        if found is None or found.error is not None:
            self._log.warning("topic %s is not available yet", topic)
            return False
        return True

    def queued(self) -> int:
        """Records handed to the producer and not yet acknowledged or failed."""
        return len(self._producer)

    def flush(self, timeout: float) -> int:
        """Blocking: wait up to ``timeout`` s for queued records; returns how many remain.
        Only once the poll thread stopped (:meth:`stop` does): reports served here are
        handed over by the caller."""
        return int(self._producer.flush(timeout))

    def stop(self, timeout: float = 10.0) -> int:
        """Blocking: stop the poll thread, then deliver what is queued (up to ``timeout``)
        so its futures still settle; returns the number of records left undelivered."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(POLL_TIMEOUT * 4)
        left = self.flush(timeout)
        self._hand_over()
        return left

    async def aclose(self, flush_timeout: float = 5.0) -> int:
        """:meth:`stop` off the loop, with a warning if records are left."""
        left = await asyncio.to_thread(self.stop, flush_timeout)
        if left:
            self._log.warning("%d record(s) not acknowledged by the broker at shutdown", left)
        return left

    # --- sending -----------------------------------------------------------------------

    def send(
        self, topic: str, records: Sequence[tuple[bytes, bytes]]
    ) -> list[asyncio.Future[None]]:
        """Enqueue ``(key, value)`` records; one future per record settles with the broker's
        acknowledgement or ``error(report)``. Raises BufferError (local queue full) or
        KafkaException; then none of these records' futures is left pending."""
        loop = self._loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        produce = self._producer.produce
        delivered = self._delivered
        try:
            for key, value in records:
                fut: asyncio.Future[None] = loop.create_future()
                produce(topic, value, key, on_delivery=functools.partial(delivered, fut))
                futures.append(fut)
        except (BufferError, KafkaException):
            discard_futures(futures)
            raise
        return futures

    async def send_batch(self, records: Sequence[OutRecord]) -> asyncio.Future[None]:
        """Queue ``records`` (in order; waits while the local queue is full); the future
        resolves when all are acknowledged, or fails with the first delivery error."""
        loop = self._loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not records:
            done.set_result(None)
            return done
        on_delivery = self._batch_callback(done, len(records))
        produce = self._producer.produce
        for topic, key, value, partition, headers in records:
            while True:
                try:
                    # -1: librdkafka's "unassigned", i.e. the partitioner chooses
                    produce(
                        topic,
                        value,
                        key,
                        -1 if partition is None else partition,
                        headers=headers,
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    await asyncio.sleep(0.005)  # queue full: the poll thread serves reports
                    produce = self._producer.produce  # it may have been replaced meanwhile
        return done

    # --- delivery reports (on the poll thread) -----------------------------------------

    def _delivered(self, fut: asyncio.Future[None], err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            self._last_error = None  # the broker is back: log the next outage again
        self._reports.append((fut, err))

    def _batch_callback(
        self, done: asyncio.Future[None], n: int
    ) -> Callable[[KafkaError | None, Message], None]:
        # Only the thread serving reports touches ``state``: remaining, first error.
        state: list[Any] = [n, None]

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None and state[1] is None:
                state[1] = err
            state[0] -= 1
            if state[0] == 0:
                if state[1] is None:
                    self._last_error = None
                self._reports.append((done, state[1]))

        return on_delivery

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            self._poll_once()
            if self._fatal.is_set():
                self._replace_producer()
            self._hand_over()

    def _poll_once(self) -> None:
        try:
            self._producer.poll(POLL_TIMEOUT)
        except KafkaException as exc:
            err = exc.args[0]
            if err.fatal():
                self._log.error("kafka producer hit a fatal error: %s", _text(err))
                self._fatal.set()
            else:
                self._log.warning("kafka producer poll failed: %s", _text(err))
        except Exception:  # a failing callback must not end delivery reports for good
            self._log.exception("kafka producer poll failed")

    def _replace_producer(self) -> None:
        """Start a new producer (a new producer id); purge the old one, whose records then
        fail, and serve those reports (bounded) so each settles its caller's future."""
        self._fatal.clear()
        old, self._producer = self._producer, Producer(self._config)
        self._log.warning(
            "kafka producer replaced after a fatal error; %d record(s) failed", len(old)
        )
        try:
            old.purge()
        except KafkaException:
            pass
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
            loop.call_soon_threadsafe(self._settle_all, reports)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _on_error(self, err: KafkaError) -> None:
        reason = err.str()
        if reason != self._last_error:  # librdkafka repeats the same error on every retry
            self._log.warning("kafka: %s", reason)
            self._last_error = reason
        if err.fatal():
            self._log.error("kafka producer hit a fatal error: %s", reason)
            self._fatal.set()

    # --- on the loop -------------------------------------------------------------------

    def _settle_all(self, reports: list[_Report]) -> None:
        error = self._error
        for fut, err in reports:
            if fut.done():
                continue
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(error(err))


def discard_futures(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel the pending futures and mark failed ones retrieved (no "exception was never
    retrieved" noise): for callers that give up waiting."""
    for fut in futures:
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled():
            fut.exception()


def _text(err: object) -> str:
    return err.str() if isinstance(err, KafkaError) else str(err)
