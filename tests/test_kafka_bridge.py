"""The one confluent-kafka -> asyncio bridge (``mailmeta.kafka.AsyncProducer``) on real
brokers: per-record and per-batch futures, delivery errors, close, fatal-error recovery."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic

from mailmeta.config import Settings
from mailmeta.kafka import AsyncProducer, OutRecord, admin, producer_config
from mailmeta.local.process import free_port
from tests.kafka_helpers import consume

# The asyncio bridge is the Kafka client code most exposed to broker differences.
pytestmark = pytest.mark.broker_compat


def _records(n: int, tag: str) -> list[tuple[bytes, bytes]]:
    return [(f"k{i}".encode(), f"{tag}-{i}".encode()) for i in range(n)]


def _values(settings: Settings, topic: str, n: int) -> list[bytes]:
    return [m.value() for m in consume(settings.kafka_bootstrap, topic, n, timeout=30)]


# librdkafka's log of the refused connections (error_cb reports them too).
_quiet = logging.getLogger("tests.kafka_bridge.librdkafka")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


class Failed(Exception):
    """What these tests' producers turn a failed delivery report into."""

    def __init__(self, err: KafkaError) -> None:
        super().__init__(err.str())
        self.code = err.code()


@pytest.mark.asyncio
async def test_per_record_futures_settle_once_the_broker_acknowledged(settings: Settings) -> None:
    kafka = AsyncProducer(producer_config(settings), name="test")
    kafka.start()
    try:
        assert await kafka.warm_up(settings.raw_topic)
        records = _records(300, "r")
        futures = kafka.send(settings.raw_topic, records)
        assert len(futures) == 300
        await asyncio.wait_for(asyncio.gather(*futures), 30)
        assert kafka.queued() == 0
    finally:
        assert await kafka.aclose() == 0
    got = await asyncio.to_thread(_values, settings, settings.raw_topic, 300)
    assert sorted(got) == sorted(v for _, v in records)


@pytest.mark.asyncio
async def test_a_batch_future_resolves_when_every_record_is_stored(settings: Settings) -> None:
    kafka = AsyncProducer(producer_config(settings), name="test")
    kafka.start()
    try:
        batch: list[OutRecord] = [
            (settings.redacted_topic, f"k{i}".encode(), f"b-{i}".encode(), 0, [("h", b"v")])
            for i in range(500)
        ]
        await asyncio.wait_for(await kafka.send_batch(batch), 30)
        assert kafka.queued() == 0
        empty = await kafka.send_batch([])
        assert empty.done() and empty.result() is None
    finally:
        await kafka.aclose()
    got = await asyncio.to_thread(_values, settings, settings.redacted_topic, 500)
    assert got == [f"b-{i}".encode() for i in range(500)]  # one partition: in order


# Tansu creates a topic on its first produce; Apache Kafka here does not.
@pytest.mark.parametrize("broker", ["kafka"], indirect=True)
@pytest.mark.asyncio
async def test_a_missing_topic_fails_the_batch_and_the_records(settings: Settings) -> None:
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    conf = producer_config(settings, **{"message.timeout.ms": 2000})
    kafka = AsyncProducer(conf, name="test", error=Failed)
    kafka.start()
    try:
        batch: list[OutRecord] = [
            (settings.redacted_topic, b"k", b"stored", None, None),
            (missing, b"k", b"lost", None, None),
            (settings.redacted_topic, b"k", b"stored too", None, None),
        ]
        done = await kafka.send_batch(batch)
        [one] = kafka.send(missing, [(b"k", b"lost")])
        with pytest.raises(Failed) as batch_failure:
            await asyncio.wait_for(done, 20)
        with pytest.raises(Failed) as record_failure:
            await asyncio.wait_for(one, 20)
    finally:
        await kafka.aclose()
    expected = {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._MSG_TIMED_OUT,
    }
    assert batch_failure.value.code in expected
    assert record_failure.value.code in expected
    # The batch's other records were still stored: only the failing one failed it.
    got = await asyncio.to_thread(_values, settings, settings.redacted_topic, 2)
    assert sorted(got) == [b"stored", b"stored too"]


@pytest.mark.asyncio
async def test_without_a_broker_records_and_batches_time_out() -> None:
    nobody = {"bootstrap.servers": f"127.0.0.1:{free_port()}", "message.timeout.ms": 1500}
    for error in (Failed, KafkaException):  # KafkaException: the default
        kafka = AsyncProducer({**nobody, "logger": _quiet}, name="test", error=error)
        kafka.start()
        try:
            done = await kafka.send_batch(
                [("t", None, b"x", None, None), ("t", None, b"y", 0, None)]
            )
            futures = kafka.send("t", _records(3, "t"))
            results = await asyncio.wait_for(
                asyncio.gather(done, *futures, return_exceptions=True), 20
            )
            assert all(isinstance(r, error) for r in results), results
            if error is Failed:
                assert {r.code for r in results} == {KafkaError._MSG_TIMED_OUT}
        finally:
            assert await kafka.aclose(flush_timeout=1) == 0


@pytest.mark.asyncio
async def test_close_delivers_what_is_still_queued(settings: Settings) -> None:
    # A long linger keeps the records in the local queue until close flushes them.
    kafka = AsyncProducer(producer_config(settings, **{"linger.ms": 5000}), name="test")
    kafka.start()
    assert await kafka.warm_up(settings.raw_topic)
    futures = kafka.send(settings.raw_topic, _records(50, "c"))
    batch = await kafka.send_batch([(settings.raw_topic, None, b"batch", None, None)])
    assert kafka.queued() == 51
    assert await kafka.aclose(flush_timeout=20) == 0
    await asyncio.wait_for(asyncio.gather(batch, *futures), 5)  # settled by the close
    got = await asyncio.to_thread(_values, settings, settings.raw_topic, 51)
    assert len(got) == 51 and b"batch" in got


@pytest.mark.asyncio
async def test_an_idle_producer_does_not_spin(settings: Settings) -> None:
    kafka = AsyncProducer(producer_config(settings), name="test")
    kafka.start()
    try:
        assert await kafka.warm_up(settings.raw_topic)
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(2.0)  # the measurement window, not a synchronisation
        used = time.process_time() - cpu
        # A busy poll loop would use about the whole window.
        assert used < 0.2 * (time.monotonic() - wall), used
    finally:
        await kafka.aclose()


@pytest.mark.parametrize("broker", ["kafka"], indirect=True)
@pytest.mark.asyncio
async def test_a_fatal_error_replaces_the_producer(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    # With the gapless guarantee, a batch the broker rejects for good (here: larger than
    # the topic's max.message.bytes) is a fatal error for the idempotent producer (Apache
    # Kafka enforces the topic limit; Tansu does not).
    small = f"small-{uuid.uuid4().hex[:8]}"
    client = admin(settings)  # kept: the result needs the client alive
    created = client.create_topics([NewTopic(small, 1, 1, config={"max.message.bytes": "2000"})])
    created[small].result(30)
    conf: dict[str, Any] = producer_config(settings, **{"enable.gapless.guarantee": True})
    kafka = AsyncProducer(conf, name="test", error=Failed)
    kafka.start()
    try:
        deadline = time.monotonic() + 30
        while not await kafka.warm_up(small):  # the new topic's metadata spreads
            assert time.monotonic() < deadline
        caplog.set_level(logging.WARNING, "mailmeta.test.producer")
        [too_big] = kafka.send(small, [(b"k", b"x" * 10_000)])
        with pytest.raises(Failed):
            await asyncio.wait_for(too_big, 20)
        # The replacement producer (a new producer id) delivers again.
        deadline = time.monotonic() + 30
        while True:
            [ok] = kafka.send(small, [(b"k", b"fits")])
            try:
                await asyncio.wait_for(ok, 20)
                break
            except Failed:
                # Records queued while the old producer was being purged fail with it.
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
    finally:
        await kafka.aclose()
    replaced = [r for r in caplog.records if "producer replaced after a fatal" in r.message]
    assert replaced and replaced[0].name == "mailmeta.test.producer"
    assert b"fits" in await asyncio.to_thread(_values, settings, small, 1)
