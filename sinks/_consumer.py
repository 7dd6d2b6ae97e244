"""The sink's Kafka consumer: redacted topic -> batches -> ClickHouse, then commit.

At-least-once: offsets are committed (synchronously) only after the batch is inserted and
its dead letters are acknowledged; a failure is retried with backoff, never skipped. A
redelivered event collapses into the row it duplicates (ReplacingMergeTree).

Two threads: one consumes and batches while a writer inserts the batch before. ClickHouse's
insert runs without the GIL, so consuming the next batch overlaps it (one batch in hand, one
being written: bounded memory, and backpressure on the consumer). The writer hands each
stored batch back and the consumer thread commits it: the Kafka consumer is only ever used
from its own thread. Batches are stored and committed in order.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from mailmeta.config import Customers, Settings
from mailmeta.kafka import consumer_config, producer_config
from mailmeta.schema import DeadLetter, Event, SchemaError, control_of, decode_event
from mailmeta.sinks import _metrics as metrics
from mailmeta.sinks._drain import DrainState
from mailmeta.store import Store

log = logging.getLogger("mailmeta.sinks.consumer")

GROUP_ID = "mailmeta-sink"
MAX_ROWS = 25_000  # larger parts: ~25% less ClickHouse CPU per row than 10k (bench)
# Seconds a lone event waits for company before its batch is inserted (settings.sink_max_wait_ms).
MAX_WAIT = 0.5
IDLE_POLL = 0.5  # blocking poll while idle: ~0 CPU, and stop() is noticed within this
_BACKOFF_MAX = 5.0
_COMMIT_ATTEMPTS = 3
_WRITER_POLL = 0.05  # poll timeout while a batch is being written, so its commit is prompt
_T = TypeVar("_T")


class _Aborted(Exception):
    """stop() ran out of time while a batch was still being retried."""


@dataclass
class _Batch:
    # Event records as they came: decoded all at once at flush (see _decode).
    records_in: list[Message] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    dead_kinds: dict[str, int] = field(default_factory=dict)  # metric reason -> records
    markers: list[tuple[str, int, int]] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    started: float = 0.0
    records: int = 0
    oldest_ms: int = 0  # Kafka timestamp of its oldest record (0: none known)
    # The store's columnwise decoding of records_in, done on the consumer thread (see _flush);
    # None when it declined the batch or the store has no such path.
    prepared: Any = None

    def add(self, msg: Message) -> None:
        if not self.records:
            self.started = time.monotonic()
        self.records += 1
        self.offsets[(msg.topic() or "", msg.partition() or 0)] = (msg.offset() or 0) + 1
        ts = msg.timestamp()[1]
        if ts > 0 and (not self.oldest_ms or ts < self.oldest_ms):
            self.oldest_ms = ts

    def kill(
        self, msg: Message, why: str, kind: str, obj: object, customers: frozenset[str]
    ) -> None:
        """Dead-letter ``msg``: why, ``obj``'s ids (the record as far as it decoded) and
        where, never its payload (``kind``: the metric's reason label)."""
        where = (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
        self.dead.append(DeadLetter.of(obj, why, where, customers))
        self.dead_kinds[kind] = self.dead_kinds.get(kind, 0) + 1


@dataclass
class ConsumerStats:
    state: str = "starting"
    rows_inserted: int = 0
    dead_lettered: int = 0
    batches: int = 0
    polls: int = 0  # turns of the consumer loop: each one is a chance to commit
    last_error: str | None = None


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
        self._region = customers.region if customers is not None else settings.region
        # Customers pinned to another region, by id -> their region.
        self._elsewhere: dict[str, str] = (
            {}
            if customers is None
            else {c.id: r for c in customers if (r := customers.elsewhere(c)) is not None}
        )
        self._elsewhere_ids = pa.array(sorted(self._elsewhere), pa.string())
        # The customer ids a dead letter may name (any other value there is the record's).
        self._known = frozenset(c.id for c in customers) if customers is not None else frozenset()
        self._store = store
        self._drain = drain
        self._group_id = group_id
        self._max_rows = max_rows
        self._max_wait = max_wait
        self._batch = _Batch()
        self._stopping = threading.Event()
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        # One batch waits here while the writer stores the one before it.
        self._handoff: queue.Queue[_Batch | None] = queue.Queue(maxsize=1)
        self._writer_error: BaseException | None = None
        # Batches the writer stored, for the consumer thread to commit in order.
        self._stored: queue.SimpleQueue[_Batch] = queue.SimpleQueue()
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self.stats = ConsumerStats()
        self._last_kafka_error = ""

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        s = self._settings
        kafka_log = logging.getLogger("mailmeta.sinks.kafka")
        self._consumer = Consumer(consumer_config(s, self._group_id, logger=kafka_log))
        self._producer = Producer(producer_config(s, logger=kafka_log))
        self._consumer.subscribe(
            [s.redacted_topic], on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._writer = threading.Thread(
            target=self._write_loop, name="mailmeta-sink-writer", daemon=True
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
        consumer = self._consumer
        assert consumer is not None
        self.stats.state = "running"
        try:
            while not self._stopping.is_set():
                self._check_writer()
                self._commit_stored()
                batch = self._batch
                if batch.records:
                    timeout = max(0.0, batch.started + self._max_wait - time.monotonic())
                else:
                    timeout = IDLE_POLL
                if self._handoff.unfinished_tasks:
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
        except _Aborted:
            self.stats.state = "stopped"
        except Exception as exc:
            # Not expected (every batch step retries): report it on /healthz, do not hide it.
            log.exception("sink consumer failed")
            self.stats.state = "failed"
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._finish_writer()
            self._close()

    # --- the writer --------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch = self._handoff.get()
            try:
                if batch is None:
                    return
                self._store_batch(batch)
            except BaseException as exc:  # handed to the consumer thread
                self._writer_error = exc
                return
            finally:
                self._handoff.task_done()

    def _check_writer(self) -> None:
        exc = self._writer_error
        if exc is not None:
            raise exc

    def _hand_off(self, batch: _Batch | None) -> None:
        writer = self._writer
        while writer is not None and writer.is_alive():
            try:
                self._handoff.put(batch, timeout=0.1)
                return
            except queue.Full:
                if self._abort.is_set():
                    raise _Aborted from None
        self._check_writer()

    def _wait_written(self) -> None:
        """Until every batch handed off is stored and committed (or the writer ended)."""
        writer = self._writer
        while writer is not None and writer.is_alive():
            with self._handoff.all_tasks_done:
                if not self._handoff.unfinished_tasks:
                    break
                self._handoff.all_tasks_done.wait(0.1)
            if self._abort.is_set():
                raise _Aborted
        self._check_writer()
        self._commit_stored()

    def _finish_writer(self) -> None:
        """Let the writer store what was handed off, then end it (sooner once aborted)."""
        writer = self._writer
        if writer is None or not writer.is_alive():
            return
        try:
            self._hand_off(None)
        except _Aborted:
            pass
        while writer.is_alive() and not self._abort.is_set():
            writer.join(0.1)
        writer.join(1.0)  # an aborted retry ends within its wait
        if not self._abort.is_set():
            self._commit_stored()

    def _close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()  # leaves the group, so a restart rejoins at once
            except Exception as exc:
                log.warning("closing the Kafka consumer failed: %s", exc)
        if self._producer is not None:
            # Dead letters still queued belong to an uncommitted batch: they will be resent.
            if self._producer.flush(2.0):
                self._producer.purge()
            self._producer.close()

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
        batch = self._batch
        batch.add(msg)
        value = msg.value()
        if not value:
            batch.kill(msg, "empty record", "schema", None, self._known)
            return
        try:
            control = control_of(value)
        except orjson.JSONDecodeError:
            batch.kill(msg, "control record is not JSON", "schema", None, self._known)
            return
        if control is not None:
            marker = _drain_marker(control, msg.partition() or 0)
            if marker is None:
                log.warning("ignoring unknown control record at %s", _where(msg))
            else:
                batch.markers.append(marker)
            return
        batch.records_in.append(msg)

    def _decode(self, batch: _Batch) -> None:
        """Per-event decode and check: names each bad record, for the dead-letter topic."""
        for msg in batch.records_in:
            try:
                event = decode_event(msg.value() or b"")
            except SchemaError as exc:
                batch.kill(msg, str(exc), "schema", _loose(msg.value()), self._known)
                continue
            region = self._elsewhere.get(event.customer_id)
            if region is not None:
                reason = (
                    f"customer {event.customer_id!r} is served in region {region!r}, "
                    f"not in {self._region!r}"
                )
                batch.kill(msg, reason, "region", event, self._known)
                continue
            reason = self._store.check_event(event)
            if reason is not None:
                batch.kill(msg, reason, "unstorable", event, self._known)
                continue
            batch.events.append(event)

    def _insert(self, batch: _Batch) -> int:
        """Insert the batch's events; returns how many (duplicates within it count)."""
        if not batch.records_in:
            return 0
        # The columnwise path (one JSON parse and check for the whole batch) when the store
        # has it; it declines, writing nothing, a batch with any record it cannot vouch for.
        prepared = batch.prepared
        if prepared is not None:
            # Looked up on each attempt, like insert_events below (the store may be swapped).
            done = self._retry("insert", lambda: self._store.insert_prepared(prepared))
            if done is not None:
                return len(batch.records_in)
        self._decode(batch)
        if batch.events:
            self._retry("insert", lambda: self._store.insert_events(batch.events))
        return len(batch.events)

    # --- flushing ----------------------------------------------------------------------------

    def _flush(self, trigger: str) -> None:
        """Hand the batch in hand to the writer (waits while it still writes the one before)."""
        batch, self._batch = self._batch, _Batch()
        if not batch.records:
            return
        metrics.FLUSHES.labels(trigger=trigger).inc()
        metrics.BATCH_ROWS.observe(batch.records)
        if batch.records_in:
            # Decoding here overlaps the writer's insert of the batch before.
            prepared = self._store.prepare_json([msg.value() or b"" for msg in batch.records_in])
            if prepared is not None and self._elsewhere:
                ids = prepared.table.column("customer_id")
                if pc.any(pc.is_in(ids, value_set=self._elsewhere_ids)).as_py():
                    prepared = None  # the per-event path dead-letters them by name
            batch.prepared = prepared
        self._hand_off(batch)

    def _store_batch(self, batch: _Batch) -> None:
        t0 = time.monotonic()
        stored = self._insert(batch)
        if batch.records_in:
            metrics.INSERT_SECONDS.observe(time.monotonic() - t0)
        self.stats.rows_inserted += stored
        metrics.EVENTS_STORED.inc(stored)
        if batch.dead:
            self._retry("dead letter", lambda: self._send_dead(batch.dead))
            self.stats.dead_lettered += len(batch.dead)
            for kind, n in batch.dead_kinds.items():
                metrics.DEAD_LETTERS.labels(reason=kind).inc(n)
            first = batch.dead[0]
            log.warning(
                "sent %d record(s) to %s, first at %s/%s@%s: %s",
                len(batch.dead),
                self._settings.deadletter_topic,
                first.topic,
                first.partition,
                first.offset,
                first.reason,
            )
        if batch.oldest_ms:
            metrics.DELAY_SECONDS.observe(max(0.0, time.time() - batch.oldest_ms / 1000))
        self._stored.put(batch)
        if self.stats.state == "retrying":
            self.stats.state = "running"

    def _commit_stored(self) -> None:
        """Commit the batches the writer has stored (on the consumer's own thread)."""
        while True:
            try:
                batch = self._stored.get_nowait()
            except queue.Empty:
                return
            if self._commit(batch.offsets):
                # Only now is everything before these markers stored and committed.
                self._drain.record(batch.markers)
            self.stats.batches += 1

    def _retry(self, what: str, fn: Callable[[], _T]) -> _T:
        delay = 0.1
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                attempt += 1
                if what == "insert":
                    metrics.STORE_ERRORS.inc()
                self.stats.state = "retrying"
                self.stats.last_error = f"{what}: {exc}"
                log.warning(
                    "%s failed (attempt %d), retrying in %.1fs: %s", what, attempt, delay, exc
                )
                if self._abort.wait(delay):
                    raise _Aborted from exc
                delay = min(delay * 2, _BACKOFF_MAX)

    def _send_dead(self, dead: list[DeadLetter]) -> None:
        producer = self._producer
        assert producer is not None
        failures: list[str] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        for letter in dead:
            # Not the record's key, value or headers: any may hold what the record held.
            producer.produce(
                self._settings.deadletter_topic,
                value=letter.value(),
                key=letter.key(),
                headers=letter.headers(),
                on_delivery=delivered,
            )
        left = producer.flush(10.0)
        if left or failures:
            # Resending all of them may duplicate some dead letters: at-least-once, as usual.
            raise KafkaException(f"{left} undelivered, errors: {failures[:3]}")

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

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Store and commit what we hold while the partitions are still ours.
        if self._batch.records:
            self._flush("rebalance")
        self._wait_written()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commits would fail now; the new owner re-reads these records (a batch already
        # with the writer is stored, and its commit fails harmlessly).
        self._batch = _Batch()


def _drain_marker(control: dict[str, Any], partition: int) -> tuple[str, int, int] | None:
    nonce = control.get("nonce")
    src = control.get("from")
    if control.get("_control") != "drain" or not isinstance(nonce, str | int):
        return None
    if not isinstance(src, int) or isinstance(src, bool):
        return None
    return (str(nonce), partition, src)


def _loose(value: bytes | None) -> object:
    """The record as JSON if it parses at all (for its ids), else None."""
    try:
        return orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None


def _where(msg: Message) -> str:
    return f"{msg.topic()}/{msg.partition()}@{msg.offset()}"
