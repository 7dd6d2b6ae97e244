"""The sink's pure parts, without a broker: the batcher (records in; events, dead letters and
drain markers out) and the retry policy (store and Kafka failures retried, a bug raised).

Records are real confluent-kafka ``Message`` objects with real redacted events; the store's
check and columnwise decoding are a real ClickHouseStore's (chdb)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka import KafkaException, Message

from mailmeta.config import Customers, parse_customers
from mailmeta.schema import encode_drain_marker, encode_event
from mailmeta.sinks._batch import Batch, Batcher
from mailmeta.sinks._retry import Aborted, backoff, retry, retryable
from mailmeta.store import ClickHouseStore, StoreError, UnstorableEvent
from tests.event_helpers import Redacted

CUSTOMERS = parse_customers(
    {
        "regions": {"eu": {"api_url": "https://eu.api.example"}},
        "customers": [
            {"id": "acme", "domains": ["acme.example"], "retention_days": 60, "region": "eu"},
            {"id": "home", "domains": ["home.example"], "retention_days": 30},
        ],
    },
    "test",
).serving("eu")
redacted = Redacted(CUSTOMERS)
TOPIC = "mailmeta.redacted.eu"


def record(value: bytes | None, offset: int, partition: int = 0, ts: int = 0) -> Message:
    return Message(topic=TOPIC, partition=partition, offset=offset, value=value, timestamp=(1, ts))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ClickHouseStore]:
    s = ClickHouseStore(f"chdb://{tmp_path / 'ch'}", {"acme": 60, "home": 30})
    try:
        yield s
    finally:
        s.close()


def test_records_are_sorted_into_events_markers_and_dead_letters() -> None:
    batcher, batch = Batcher(CUSTOMERS), Batch()
    event = redacted("acme")
    values = [
        encode_event(event),
        b"",
        b'{"_control": "drain", "nonce": "n1", "from": 2}',
        b'{"_control": "other"}',
        b'{"_control" oops',
    ]
    for offset, value in enumerate(values):
        batcher.take(batch, record(value, offset, partition=1, ts=1_000 + offset))
    assert batch.records == 5
    assert batch.offsets == {(TOPIC, 1): 5}  # every record is committed with the batch
    assert batch.oldest_ms == 1_000
    assert [m.offset() for m in batch.records_in] == [0]  # decoded at flush
    assert batch.markers == [("n1", 1, 2)]  # the unknown control record is ignored
    assert [(d.offset, d.reason) for d in batch.dead] == [
        (1, "empty record"),
        (4, "control record is not JSON"),
    ]
    assert batch.dead_kinds == {"schema": 2}


def test_decode_names_each_bad_record_and_keeps_the_rest(store: ClickHouseStore) -> None:
    batcher, batch = Batcher(CUSTOMERS), Batch()
    good, home = redacted("acme"), redacted("home")
    unknown = orjson.loads(encode_event(good))
    unknown["customer_id"] = "nobody"
    values = [
        encode_event(good),
        encode_event(home),  # served in the default region: never stored here
        b'{"event_id": "not-a-uuid", "customer_id": "acme"}',
        orjson.dumps(unknown),  # schema-valid, but the store holds no such customer
    ]
    for offset, value in enumerate(values):
        batcher.take(batch, record(value, offset))
    batcher.decode(batch, store.check_event)
    assert [e.event_id for e in batch.events] == [good.event_id]
    dead = {d.offset: d for d in batch.dead}
    assert sorted(dead) == [1, 2, 3]
    assert dead[1].reason == "customer 'home' is served in region 'default', not in 'eu'"
    # Ids kept only in the shape mailmeta mints: one of the file's customers, a UUID.
    assert (dead[1].customer_id, dead[1].event_id) == ("home", home.event_id)
    assert (dead[2].customer_id, dead[2].event_id) == ("acme", None)
    assert (dead[3].customer_id, dead[3].event_id) == (None, good.event_id)
    assert batch.dead_kinds == {"region": 1, "schema": 1, "unstorable": 1}
    # Nothing of a record's payload is in its dead letter.
    assert b"sender" not in b"".join(d.value() for d in batch.dead)


def test_the_columnwise_batch_is_declined_when_it_holds_another_regions_event(
    store: ClickHouseStore,
) -> None:
    batcher = Batcher(CUSTOMERS)
    ours = [encode_event(redacted("acme")) for _ in range(3)]
    assert batcher.vouch(store.prepare_json(ours)) is not None
    mixed = store.prepare_json([*ours, encode_event(redacted("home"))])
    assert mixed is not None  # the store itself would take it ...
    assert batcher.vouch(mixed) is None  # ... the per-event path dead-letters it by name
    # A sink with no customers served elsewhere vouches for what the store prepared.
    assert Batcher(Customers([], region="eu")).vouch(mixed) is mixed


def test_drain_markers_keep_their_order_and_partition() -> None:
    batcher, batch = Batcher(CUSTOMERS), Batch()
    batcher.take(batch, record(encode_drain_marker("n", 0), 7, partition=2))
    batcher.take(batch, record(encode_drain_marker("n", 1), 8, partition=2))
    batcher.take(batch, record(encode_drain_marker("n"), 9, partition=2))  # no "from": not one
    assert batch.markers == [("n", 2, 0), ("n", 2, 1)]
    assert not batch.dead and not batch.records_in


# --- the retry policy --------------------------------------------------------------------


def test_only_store_and_kafka_failures_are_retryable() -> None:
    assert retryable(StoreError("ClickHouse is down"))
    assert retryable(KafkaException("broker away"))
    assert retryable(BufferError("local queue full"))
    for bug in (TypeError("bad row"), KeyError("x"), UnstorableEvent("check let it by")):
        assert not retryable(bug)
    assert [backoff(n) for n in (1, 2, 3, 7, 20)] == [0.1, 0.2, 0.4, 5.0, 5.0]


def test_a_store_failure_is_retried_until_it_passes() -> None:
    calls: list[int] = []
    failures: list[str] = []

    def insert() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise StoreError("ClickHouse is down")
        return 42

    got = retry("insert", insert, threading.Event(), lambda what, exc: failures.append(what))
    assert got == 42
    assert len(calls) == 3 and failures == ["insert", "insert"]


def test_a_bug_is_raised_at_once_not_retried_forever() -> None:
    calls: list[int] = []
    failures: list[str] = []

    def insert() -> int:
        calls.append(1)
        return len(None)  # type: ignore[arg-type]  # a TypeError, as a bad row would raise

    with pytest.raises(TypeError):
        retry("insert", insert, threading.Event(), lambda what, exc: failures.append(what))
    assert len(calls) == 1 and failures == []


def test_a_retry_ends_when_aborted() -> None:
    abort = threading.Event()

    def down() -> None:
        abort.set()  # stop() ran out of time while the store was away
        raise StoreError("ClickHouse is down")

    with pytest.raises(Aborted):
        retry("insert", down, abort, lambda what, exc: None)
