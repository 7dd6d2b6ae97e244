"""The sink's batcher: records of the redacted topic in; events to insert, dead letters and
drain markers out. Pure: no Kafka client, no store, no threads (the store's own event check
is passed in), so it is tested without a broker (tests/test_sink_batcher.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Message

from mailmeta.config import Customers
from mailmeta.schema import DeadLetter, Event, SchemaError, control_of, decode_event
from mailmeta.store import PreparedBatch

log = logging.getLogger("mailmeta.sinks.consumer")

# A drain marker: (nonce, redacted partition it came on, raw partition it came from).
Marker = tuple[str, int, int]


@dataclass
class Batch:
    """Records taken since the last flush, and what became of each."""

    # Event records as they came: decoded all at once at flush (see Batcher.decode).
    records_in: list[Message] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    dead_kinds: dict[str, int] = field(default_factory=dict)  # metric reason -> records
    markers: list[Marker] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset to commit
    started: float = 0.0
    records: int = 0
    oldest_ms: int = 0  # Kafka timestamp of its oldest record (0: none known)
    # The store's columnwise decoding of records_in, done on the consumer thread at flush;
    # None when it declined the batch or the store has no such path.
    prepared: PreparedBatch | None = None

    def add(self, msg: Message) -> None:
        """Count ``msg`` in: its offset is committed with the batch, whatever becomes of it."""
        if not self.records:
            self.started = time.monotonic()
        self.records += 1
        self.offsets[(msg.topic() or "", msg.partition() or 0)] = (msg.offset() or 0) + 1
        ts = msg.timestamp()[1]
        if ts > 0 and (not self.oldest_ms or ts < self.oldest_ms):
            self.oldest_ms = ts

    def dead_letter(
        self, msg: Message, why: str, kind: str, obj: object, customers: Customers
    ) -> None:
        """Dead-letter ``msg``: why, ``obj``'s ids (the record as far as it decoded) and
        where, never its payload (``kind``: the metric's reason label)."""
        where = (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
        self.dead.append(DeadLetter.of(obj, why, where, customers.by_id))
        self.dead_kinds[kind] = self.dead_kinds.get(kind, 0) + 1


class Batcher:
    """Sorts records into a batch. ``customers`` as seen from the region this sink serves:
    events of a customer served elsewhere are dead-lettered, never stored."""

    def __init__(self, customers: Customers) -> None:
        self.customers = customers
        away = [c.id for c in customers if customers.served_elsewhere(c.id) is not None]
        self._away_ids = pa.array(sorted(away), pa.string()) if away else None

    def take(self, batch: Batch, msg: Message) -> None:
        """Sort in one record (not a Kafka error): a drain marker, an event record to decode
        at flush, or a dead letter when it cannot be either."""
        batch.add(msg)
        value = msg.value()
        if not value:
            batch.dead_letter(msg, "empty record", "schema", None, self.customers)
            return
        try:
            control = control_of(value)
        except orjson.JSONDecodeError:
            batch.dead_letter(msg, "control record is not JSON", "schema", None, self.customers)
            return
        if control is not None:
            marker = drain_marker(control, msg.partition() or 0)
            if marker is None:
                log.warning("ignoring unknown control record at %s", _where(msg))
            else:
                batch.markers.append(marker)
            return
        batch.records_in.append(msg)

    def decode(self, batch: Batch, check: Callable[[Event], str | None]) -> None:
        """Per-event decode and check (``check``: the store's, why it cannot hold an event):
        fills ``batch.events`` and names each bad record, for the dead-letter topic."""
        for msg in batch.records_in:
            try:
                event = decode_event(msg.value() or b"")
            except SchemaError as exc:
                batch.dead_letter(msg, str(exc), "schema", _loose(msg.value()), self.customers)
                continue
            away = self.customers.served_elsewhere(event.customer_id)
            if away is not None:
                batch.dead_letter(msg, away.reason(), "region", event, self.customers)
                continue
            reason = check(event)
            if reason is not None:
                batch.dead_letter(msg, reason, "unstorable", event, self.customers)
                continue
            batch.events.append(event)

    def vouch(self, prepared: PreparedBatch | None) -> PreparedBatch | None:
        """The store's columnwise batch, unless it holds an event of a customer served
        elsewhere: then None, and the per-event path (decode) dead-letters those by name."""
        if prepared is not None and self._away_ids is not None:
            ids = prepared.table.column("customer_id")
            if pc.any(pc.is_in(ids, value_set=self._away_ids)).as_py():
                return None
        return prepared


def drain_marker(control: dict[str, object], partition: int) -> Marker | None:
    """The drain marker a control record is, as received on ``partition``; None when it
    is none (an unknown control record)."""
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
