"""The sink's writer thread: stores each batch handed to it (insert, then dead letters),
retrying store and Kafka failures (``_retry``), and hands it back for its commit.

One batch in hand, one being written: ``hand_off`` waits while the writer still stores the
batch before (bounded memory, and backpressure on the consumer). ClickHouse's insert runs
without the GIL, so the consumer thread takes the next batch meanwhile. Batches are stored,
and handed back, in order; the Kafka consumer itself is never touched here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from mailmeta.sinks import _metrics as metrics
from mailmeta.sinks._batch import Batch, Batcher
from mailmeta.sinks._deadletters import DeadLetterSender
from mailmeta.sinks._retry import Aborted, retry
from mailmeta.store import Store

log = logging.getLogger("mailmeta.sinks.consumer")


@dataclass
class ConsumerStats:
    state: str = "starting"
    rows_inserted: int = 0
    dead_lettered: int = 0
    batches: int = 0
    polls: int = 0  # turns of the consumer loop: each one is a chance to commit
    last_error: str | None = None


class BatchWriter:
    """Stores batches on a thread of its own; ``stored()`` gives them back for their commit."""

    def __init__(
        self,
        store: Store,
        batcher: Batcher,
        dead_letters: DeadLetterSender,
        stats: ConsumerStats,
        abort: threading.Event,
    ) -> None:
        self._store = store
        self._batcher = batcher
        self._dead_letters = dead_letters
        self._stats = stats
        self._abort = abort  # set by stop() when time is up: a retry ends within its wait
        self._thread: threading.Thread | None = None
        # One batch waits here while the writer stores the one before it.
        self._handoff: queue.Queue[Batch | None] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        # Batches stored, for the consumer thread to commit in order.
        self._stored: queue.SimpleQueue[Batch] = queue.SimpleQueue()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mailmeta-sink-writer", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> bool:
        """A batch handed off is not stored yet."""
        return bool(self._handoff.unfinished_tasks)

    def check(self) -> None:
        """Raise, on the caller's thread, what ended the writer (Aborted or a bug)."""
        exc = self._error
        if exc is not None:
            raise exc

    def hand_off(self, batch: Batch | None) -> None:
        """Give the writer ``batch`` (None: end after the ones before), waiting while it
        still stores the one before."""
        thread = self._thread
        while thread is not None and thread.is_alive():
            try:
                self._handoff.put(batch, timeout=0.1)
                return
            except queue.Full:
                if self._abort.is_set():
                    raise Aborted from None
        self.check()

    def wait_written(self) -> None:
        """Until every batch handed off is stored (or the writer ended)."""
        thread = self._thread
        while thread is not None and thread.is_alive():
            with self._handoff.all_tasks_done:
                if not self._handoff.unfinished_tasks:
                    break
                self._handoff.all_tasks_done.wait(0.1)
            if self._abort.is_set():
                raise Aborted
        self.check()

    def finish(self) -> None:
        """Let the writer store what was handed off, then end it (sooner once aborted)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        try:
            self.hand_off(None)
        except Aborted:
            pass
        while thread.is_alive() and not self._abort.is_set():
            thread.join(0.1)
        thread.join(1.0)  # an aborted retry ends within its wait

    def stored(self) -> list[Batch]:
        """The batches stored since the last call, in order."""
        out = []
        while True:
            try:
                out.append(self._stored.get_nowait())
            except queue.Empty:
                return out

    # --- the writer thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._handoff.get()
            try:
                if batch is None:
                    return
                self._store_batch(batch)
            except BaseException as exc:  # handed to the consumer thread (see check)
                self._error = exc
                return
            finally:
                self._handoff.task_done()

    def _failed(self, what: str, exc: BaseException) -> None:
        if what == "insert":
            metrics.STORE_ERRORS.inc()
        self._stats.state = "retrying"
        self._stats.last_error = f"{what}: {exc}"

    def _insert(self, batch: Batch) -> int:
        """Insert the batch's events; returns how many (duplicates within it count)."""
        if not batch.records_in:
            return 0
        # The columnwise path (one JSON parse and check for the whole batch) when the store
        # has it; it declines, writing nothing, a batch with any record it cannot vouch for.
        prepared = batch.prepared
        if prepared is not None:
            # Looked up on each attempt, like insert_events below (the store may be swapped).
            done = retry(
                "insert", lambda: self._store.insert_prepared(prepared), self._abort, self._failed
            )
            if done is not None:
                return len(batch.records_in)
        self._batcher.decode(batch, self._store.check_event)
        if batch.events:
            retry(
                "insert", lambda: self._store.insert_events(batch.events), self._abort, self._failed
            )
        return len(batch.events)

    def _store_batch(self, batch: Batch) -> None:
        t0 = time.monotonic()
        stored = self._insert(batch)
        if batch.records_in:
            metrics.INSERT_SECONDS.observe(time.monotonic() - t0)
        self._stats.rows_inserted += stored
        metrics.EVENTS_STORED.inc(stored)
        if batch.dead:
            retry(
                "dead letter",
                lambda: self._dead_letters.send(batch.dead),
                self._abort,
                self._failed,
            )
            self._stats.dead_lettered += len(batch.dead)
            for kind, n in batch.dead_kinds.items():
                metrics.DEAD_LETTERS.labels(reason=kind).inc(n)
            first = batch.dead[0]
            log.warning(
                "sent %d record(s) to %s, first at %s/%s@%s: %s",
                len(batch.dead),
                self._dead_letters.topic,
                first.topic,
                first.partition,
                first.offset,
                first.reason,
            )
        if batch.oldest_ms:
            metrics.DELAY_SECONDS.observe(max(0.0, time.time() - batch.oldest_ms / 1000))
        self._stored.put(batch)
        if self._stats.state == "retrying":
            self._stats.state = "running"
