"""The sink's Kafka consumer: redacted topic -> batches -> ClickHouse, then commit.

At-least-once: offsets are committed (synchronously) only after the batch is inserted and
its dead letters are acknowledged; a store or Kafka failure is retried with backoff, never
skipped, and any other error fails the consumer (``_retry``). A redelivered event collapses
into the row it duplicates (ReplacingMergeTree).

One job per module: ``_batch`` sorts records into batches (pure), ``_writer`` stores them
on its own thread, ``_deadletters`` sends what cannot be stored, ``_retry`` says what is
retried. This one owns the Kafka consumer: it polls, cuts batches, commits what the writer
stored (on the consumer's own thread, in order), and handles rebalances.
"""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from mailmeta.config import Customers, Settings
from mailmeta.kafka import consumer_config
from mailmeta.sinks import _metrics as metrics
from mailmeta.sinks._batch import Batch, Batcher
from mailmeta.sinks._deadletters import DeadLetterSender
from mailmeta.sinks._drain import DrainState
from mailmeta.sinks._retry import Aborted
from mailmeta.sinks._writer import BatchWriter, ConsumerStats
from mailmeta.store import Store

log = logging.getLogger("mailmeta.sinks.consumer")

GROUP_ID = "mailmeta-sink"
MAX_ROWS = 25_000  # larger parts: ~25% less ClickHouse CPU per row than 10k (bench)
# Seconds a lone event waits for company before its batch is inserted (settings.sink_max_wait_ms).
MAX_WAIT = 0.5
IDLE_POLL = 0.5  # blocking poll while idle: ~0 CPU, and stop() is noticed within this
_COMMIT_ATTEMPTS = 3
_WRITER_POLL = 0.05  # poll timeout while a batch is being written, so its commit is prompt

__all__ = ["GROUP_ID", "MAX_ROWS", "ConsumerStats", "SinkConsumer"]


class SinkConsumer:
    """Consumes settings.redacted_topic in a thread; start() and stop() from any thread."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        drain: DrainState,
        *,
        group_id: str = GROUP_ID,
        max_rows: int = MAX_ROWS,
        max_wait: float = MAX_WAIT,
        customers: Customers | None = None,
    ) -> None:
        """``customers``: as seen from the region this sink serves; events of a customer
        pinned to another region are dead-lettered, never stored (None: no such customers)."""
        self._settings = settings
        if customers is None:
            customers = Customers([], region=settings.region)
        self._batcher = Batcher(customers)
        self._store = store
        self._drain = drain
        self._group_id = group_id
        self._max_rows = max_rows
        self._max_wait = max_wait
        self._batch = Batch()
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._writer: BatchWriter | None = None
        self._consumer: Consumer | None = None
        self._dead_letters: DeadLetterSender | None = None
        self.stats = ConsumerStats()
        self._last_kafka_error = ""

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        s = self._settings
        kafka_log = logging.getLogger("mailmeta.sinks.kafka")
        self._consumer = Consumer(consumer_config(s, self._group_id, logger=kafka_log))
        self._dead_letters = DeadLetterSender(s, kafka_log)
        self._consumer.subscribe(
            [s.redacted_topic], on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._writer = BatchWriter(
            self._store, self._batcher, self._dead_letters, self.stats, self._abort
        )
        self._thread = threading.Thread(
            target=self._run, name="mailmeta-sink-consumer", daemon=True
        )
        self._writer.start()
        self._thread.start()

    def stop(self, timeout: float = 6.0) -> bool:
        """Insert and commit what is held, then leave the group; True when it did in time."""
        self._stopping.set()
        thread = self._thread
        if thread is None:
            return True
        # Most of the time for the final flush; then abort a retry loop and close anyway.
        thread.join(max(0.0, timeout - 1.5))
        if thread.is_alive():
            log.warning("sink consumer still flushing at shutdown: giving up on the held batch")
            self._abort.set()
            thread.join(1.5)
        return not thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        consumer, writer = self._consumer, self._writer
        assert consumer is not None and writer is not None
        self.stats.state = "running"
        try:
            while not self._stopping.is_set():
                writer.check()
                self._commit_stored()
                batch = self._batch
                if batch.records:
                    timeout = max(0.0, batch.started + self._max_wait - time.monotonic())
                else:
                    timeout = IDLE_POLL
                if writer.busy:
                    timeout = min(timeout, _WRITER_POLL)  # commit soon after it is stored
                room = max(1, self._max_rows - batch.records)
                for msg in consumer.consume(num_messages=room, timeout=timeout):
                    self._take(msg)
                self.stats.polls += 1
                batch = self._batch  # a revoke during consume() may have flushed it
                if batch.records and (
                    batch.records >= self._max_rows
                    or time.monotonic() >= batch.started + self._max_wait
                ):
                    self._flush("full" if batch.records >= self._max_rows else "waited")
            self._flush("shutdown")
            self._finish_writer()
            self.stats.state = "stopped"
        except Aborted:
            self.stats.state = "stopped"
        except Exception as exc:
            # Not retried (``_retry``: a bug, not a passing failure): on /healthz and in the
            # log with its traceback; ``mailmeta sink`` exits for its supervisor to restart.
            log.exception("sink consumer failed")
            metrics.FAILURES.labels(error=type(exc).__name__).inc()
            self.stats.state = "failed"
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._finish_writer()
            self._close()

    def _finish_writer(self) -> None:
        """Let the writer store what was handed off and end; commit what it stored."""
        writer = self._writer
        if writer is None or not writer.alive:
            return
        writer.finish()
        if not self._abort.is_set():
            self._commit_stored()

    def _close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()  # leaves the group, so a restart rejoins at once
            except Exception as exc:
                log.warning("closing the Kafka consumer failed: %s", exc)
        if self._dead_letters is not None:
            self._dead_letters.close()

    def _take(self, msg: Message) -> None:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return
            if err.fatal():
                raise KafkaException(err)
            text = str(err)
            if text != self._last_kafka_error:  # librdkafka repeats these; say it once
                log.warning("kafka: %s", text)
                self._last_kafka_error = text
            return
        self._batcher.take(self._batch, msg)

    # --- flushing and committing -------------------------------------------------------------

    def _flush(self, trigger: str) -> None:
        """Hand the batch in hand to the writer (waits while it still writes the one before)."""
        batch, self._batch = self._batch, Batch()
        if not batch.records:
            return
        metrics.FLUSHES.labels(trigger=trigger).inc()
        metrics.BATCH_ROWS.observe(batch.records)
        if batch.records_in:
            # Decoding here overlaps the writer's insert of the batch before.
            prepared = self._store.prepare_json([msg.value() or b"" for msg in batch.records_in])
            batch.prepared = self._batcher.vouch(prepared)
        assert self._writer is not None
        self._writer.hand_off(batch)

    def _commit_stored(self) -> None:
        """Commit the batches the writer has stored (on the consumer's own thread)."""
        assert self._writer is not None
        for batch in self._writer.stored():
            if self._commit(batch.offsets):
                # Only now is everything before these markers stored and committed.
                self._drain.record(batch.markers)
            self.stats.batches += 1

    def _commit(self, offsets: dict[tuple[str, int], int]) -> bool:
        consumer = self._consumer
        assert consumer is not None
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                consumer.commit(offsets=tps, asynchronous=False)
                return True
            except KafkaException as exc:
                # After a rebalance the partitions may be someone else's: their new owner
                # re-reads from the last commit and the duplicates collapse in the table.
                log.warning("commit failed (attempt %d): %s", attempt, exc)
                if self._abort.wait(0.2 * attempt):
                    break
        return False

    # --- rebalances --------------------------------------------------------------------------

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Store and commit what we hold while the partitions are still ours.
        if self._batch.records:
            self._flush("rebalance")
        assert self._writer is not None
        self._writer.wait_written()
        self._commit_stored()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commits would fail now; the new owner re-reads these records (a batch already
        # with the writer is stored, and its commit fails harmlessly).
        self._batch = Batch()
