"""At-least-once in, exactly-once effect: replay from offset 0, and ClickHouse down then back."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY

from mailmeta.config import Customer, Customers, Settings
from mailmeta.local.apache_kafka import KafkaNode
from mailmeta.local.brokers import LocalBroker
from mailmeta.schema import encode_event
from mailmeta.service import SinkService
from mailmeta.store import ClickHouseStore, StoreError
from tests.event_helpers import Redacted
from tests.kafka_helpers import produce, sink_settings, wait_until

CUSTOMERS = Customers(
    [
        Customer(
            id="idem",
            domains=["idem.example"],
            retention_days=60,
            hmac_key="idempotent-test-hmac-key-0123456789",
            policy={
                "mail_from": "hmac",
                "rcpt_to": "mask",
                "message_id": "keep",
                "subject": "keep",
            },
        )
    ]
)
redacted = Redacted(CUSTOMERS)


@pytest.fixture
def settings(broker: LocalBroker | KafkaNode, tmp_path: Path) -> Settings:
    return sink_settings(broker.bootstrap, tmp_path, CUSTOMERS, "idem", partitions=2)


def operator(settings: Settings) -> dict[str, str]:
    """The operator token the sink wrote on start, as a bearer header."""
    assert settings.operator_token_file is not None
    return {"Authorization": f"Bearer {settings.operator_token_file.read_text().strip()}"}


def rows_inserted(service: SinkService) -> int:
    assert service.consumer is not None
    return service.consumer.stats.rows_inserted


def test_replay_from_offset_zero_leaves_the_count_unchanged(settings: Settings) -> None:
    events = [redacted("idem") for _ in range(300)]
    # Upstream at-least-once: some events are on the topic twice already.
    values = [encode_event(e) for e in events] + [encode_event(e) for e in events[:50]]
    produce(settings.kafka_bootstrap, settings.redacted_topic, values)

    with SinkService(settings, CUSTOMERS, group_id=f"first-{uuid.uuid4().hex}") as first:
        wait_until(lambda: rows_inserted(first) >= 300, what="first pass")
        assert first.store is not None
        assert first.store.count("idem", visible_only=True) == 300
    # A new consumer group starts at offset 0: every record is delivered again.
    with SinkService(settings, CUSTOMERS, group_id=f"replay-{uuid.uuid4().hex}") as replay:
        wait_until(lambda: rows_inserted(replay) >= 300, what="replay")
        store = replay.store
        assert store is not None
        assert store.count("idem", visible_only=True) == 300
        with httpx.Client(base_url=replay.url, timeout=10, headers=operator(settings)) as api:
            got = api.get("/v1/messages", params={"customer": "idem", "limit": 1000}).json()
            assert sorted(m["event_id"] for m in got["messages"]) == sorted(
                e.event_id for e in events
            )
        store.force_ttl_merge()
        assert store.count("idem") == 300  # physically one row per event after the merge


class RestartableStore:
    """The sink's store with its ClickHouse stoppable and restartable, as a server would be.

    ``stop()`` really closes the ClickHouseStore (every call then fails as against a server
    that is down); ``start()`` opens a new one on the same data. Everything else is forwarded.
    """

    def __init__(self, dsn: str, retention: dict[str, int]) -> None:
        self.dsn, self.retention_days = dsn, retention
        self.inner: ClickHouseStore | None = ClickHouseStore(dsn, retention)
        self.failures = 0

    def stop(self) -> None:
        assert self.inner is not None
        self.inner.close()

    def start(self) -> None:
        self.inner = ClickHouseStore(self.dsn, self.retention_days)

    def insert_events(self, events: Any) -> int:
        assert self.inner is not None
        try:
            return self.inner.insert_events(events)
        except StoreError:
            self.failures += 1
            raise

    def insert_prepared(self, prepared: Any) -> int | None:
        assert self.inner is not None
        try:
            return self.inner.insert_prepared(prepared)
        except StoreError:
            self.failures += 1
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


@pytest.fixture
def restartable(settings: Settings) -> Iterator[RestartableStore]:
    store = RestartableStore(settings.resolved_dsn(), {"idem": 60})
    yield store
    store.close()


def test_clickhouse_down_then_back_loses_nothing(
    settings: Settings, restartable: RestartableStore
) -> None:
    service = SinkService(
        settings,
        CUSTOMERS,
        store=restartable,  # type: ignore[arg-type]
        group_id=f"down-{uuid.uuid4().hex}",
    )
    with service:
        before = [redacted("idem") for _ in range(20)]
        produce(
            settings.kafka_bootstrap, settings.redacted_topic, [encode_event(e) for e in before]
        )
        wait_until(lambda: rows_inserted(service) >= 20, what="first events")

        restartable.stop()
        during = [redacted("idem") for _ in range(40)]
        produce(
            settings.kafka_bootstrap, settings.redacted_topic, [encode_event(e) for e in during]
        )
        # The sink keeps retrying with backoff; health says so; nothing is committed.
        wait_until(lambda: restartable.failures >= 3, what="retries")
        with httpx.Client(base_url=service.url, timeout=10, headers=operator(settings)) as api:
            health = api.get("/healthz")
            assert health.status_code == 503
            assert health.json()["consumer"]["state"] == "retrying"
            assert health.json()["clickhouse"] == "unreachable"
            restartable.start()
            wait_until(lambda: rows_inserted(service) >= 60, what="events after the restart")
            assert api.get("/healthz").json()["consumer"]["state"] == "running"
            got = api.get("/v1/messages", params={"customer": "idem", "limit": 1000}).json()
        assert sorted(m["event_id"] for m in got["messages"]) == sorted(
            e.event_id for e in before + during
        )


class GatedStore(RestartableStore):
    """Its columnwise inserts wait at a gate: a batch stays "being written" while held."""

    def __init__(self, dsn: str, retention: dict[str, int]) -> None:
        super().__init__(dsn, retention)
        self.gate = threading.Event()
        self.writing = threading.Event()

    def insert_prepared(self, prepared: Any) -> int | None:
        self.writing.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().insert_prepared(prepared)


def committed(settings: Settings, group: str) -> int:
    """The group's committed offsets on the redacted topic, summed over partitions."""
    c = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    try:
        tps = [TopicPartition(settings.redacted_topic, p) for p in range(settings.partitions)]
        return sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=10))
    finally:
        c.close()


def test_a_batch_is_committed_only_once_the_writer_stored_it(settings: Settings) -> None:
    store = GatedStore(settings.resolved_dsn(), {"idem": 60})
    group = f"gated-{uuid.uuid4().hex}"
    events = [redacted("idem") for _ in range(30)]
    try:
        with SinkService(settings, CUSTOMERS, store=store, group_id=group) as service:  # type: ignore[arg-type]
            produce(
                settings.kafka_bootstrap, settings.redacted_topic, [encode_event(e) for e in events]
            )
            assert store.writing.wait(20), "the writer never started an insert"
            assert service.consumer is not None
            stats = service.consumer.stats
            # Each turn of the consumer loop is a chance to commit: none may while it writes.
            turns = stats.polls + 10
            wait_until(lambda: stats.polls >= turns, 20, "ten consumer-loop turns")
            assert committed(settings, group) == 0
            assert rows_inserted(service) == 0
            store.gate.set()
            wait_until(lambda: rows_inserted(service) >= 30, what="the held batch")
            wait_until(lambda: committed(settings, group) == 30, what="its commit")
            assert store.count("idem", visible_only=True) == 30
    finally:
        store.gate.set()
        store.close()


class BuggyStore(RestartableStore):
    """The real store behind a programming error: its columnwise path declines (as it does
    for any batch it cannot vouch for) and its per-event insert is handed the records as
    dicts instead of events, so the real store's insert fails on them (an AttributeError,
    like the TypeError of a bad row: nothing a retry can fix)."""

    def __init__(self, dsn: str, retention: dict[str, int]) -> None:
        super().__init__(dsn, retention)
        self.inserts = 0

    def insert_prepared(self, prepared: Any) -> int | None:
        return None

    def insert_events(self, events: Any) -> int:
        self.inserts += 1
        assert self.inner is not None
        return self.inner.insert_events([dataclasses.asdict(e) for e in events])


def test_a_bug_fails_the_sink_loudly_instead_of_retrying_forever(settings: Settings) -> None:
    store = BuggyStore(settings.resolved_dsn(), {"idem": 60})
    group = f"buggy-{uuid.uuid4().hex}"
    failures = REGISTRY.get_sample_value(
        "mailmeta_sink_failures_total", {"error": "AttributeError"}
    )
    try:
        with SinkService(settings, CUSTOMERS, store=store, group_id=group) as service:  # type: ignore[arg-type]
            consumer = service.consumer
            assert consumer is not None
            produce(
                settings.kafka_bootstrap,
                settings.redacted_topic,
                [encode_event(redacted("idem")) for _ in range(5)],
            )
            # Not "retrying" forever: the consumer stops, and says why.
            wait_until(lambda: not consumer.alive, what="the consumer to stop")
            assert consumer.stats.state == "failed"
            assert (consumer.stats.last_error or "").startswith("AttributeError:")
            assert store.inserts == 1  # tried once, not retried
            assert (
                REGISTRY.get_sample_value(
                    "mailmeta_sink_failures_total", {"error": "AttributeError"}
                )
                == (failures or 0) + 1
            )
            with httpx.Client(base_url=service.url, timeout=10, headers=operator(settings)) as api:
                health = api.get("/healthz").json()
            assert health["consumer"]["state"] == "failed"
            # Nothing committed: a restarted sink (the bug fixed) reads the batch again.
            assert committed(settings, group) == 0
            assert store.count("idem") == 0
    finally:
        store.close()
