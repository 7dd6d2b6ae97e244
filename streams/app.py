"""The faust redaction worker: raw topic -> customer policy in force -> redacted topic.

faust owns the topology (the raw agent and its consumer group) and the policy table: a
GlobalTable whose changelog *is* the compacted policies topic, so every worker holds every
customer's policy whatever partitions it is assigned, and sees a change within a fetch.

Throughput (DESIGN.md): raw bytes with orjson instead of faust models, the producer
written to directly, linger and large batches, sends not awaited one by one; and the
records of the raw topic reach the agent in whole fetched batches (``_fast.py``) instead
of one faust event each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import faust
import orjson
from confluent_kafka import Consumer, TopicPartition
from faust.tables.globaltable import GlobalTable

from mailmeta.config import Customers, Settings, load_customers
from mailmeta.kafka import AsyncProducer, consumer_config, faust_broker_options, producer_config
from mailmeta.policy import (
    POLICY_PARTITION,
    PolicyConflict,
    PolicyRecordError,
    RedactionError,
    Redactor,
    decode_record,
    report_invalid,
)
from mailmeta.schema import (
    DeadLetter,
    SchemaError,
    control_of,
    encode_drain_marker,
    event_from_dict,
    plainly_valid,
)
from mailmeta.streams import _metrics as metrics
from mailmeta.streams._fast import BatchApp
from mailmeta.streams._status import PolicyStatusReporter

log = logging.getLogger("mailmeta.streams")

# The faust app id, hence the consumer group whose offsets on the raw topic say what is done.
APP_ID = "mailmeta-redactor"
# How long a worker waits for the policy table to catch up before it redacts anything.
POLICY_CATCH_UP_S = 30.0


class ElsewhereError(RedactionError):
    """An event of a customer pinned to another region: never redacted or forwarded here."""


def regional_redactor(customers: Customers) -> Redactor:
    """A redactor of the region's own customers only: it holds no policy (nor key) of a
    customer served elsewhere, so such an event cannot be redacted here even by mistake."""
    return Redactor(customers.regional())


# Records transformed between yields to the event loop (~20-50 ms of work here).
SLICE = 1000


async def _all(futures: list[asyncio.Future[None]]) -> None:
    for fut in futures:
        await fut


class PolicyTable(GlobalTable):
    """A GlobalTable whose changelog is the policies topic (not ``<app>-<name>-changelog``)
    and which tells the redactor about each record it applies."""

    def __init__(
        self, *args: Any, topic_name: str, redactor: Redactor, customers: Customers, **kwargs: Any
    ) -> None:
        self._topic_name = topic_name
        self.redactor = redactor
        self.customers = customers
        self.applied_offset = -1
        super().__init__(*args, **kwargs)

    def _changelog_topic_name(self) -> str:
        # The partition assignor looks global tables' changelogs up by this name.
        return self._topic_name

    def apply_changelog_batch(self, batch: Iterable[Any]) -> None:
        events = list(batch)
        super().apply_changelog_batch(events)
        for ev in events:
            self.applied_offset = max(self.applied_offset, ev.message.offset)
            try:
                rec = decode_record(ev.key, ev.value)
            except PolicyRecordError as exc:
                # Reported, not applied, and never read as a deletion: the policy in force
                # stays in force.
                customer_id = (ev.key or b"").decode("utf-8", "replace")
                report_invalid("worker", customer_id, ev.message.offset, exc)
                continue
            if rec is None:
                continue
            away = self.customers.served_elsewhere(rec.customer_id)
            if away is not None:
                # This region's topic holds only its customers' policies: a record of another
                # region's customer is a mistake to report, never a policy to hold here.
                log.warning(
                    "ignoring policy record at offset %s: customer %r is served in region %r, "
                    "not in this one (%r)",
                    ev.message.offset, rec.customer_id, away.region, self.customers.region,
                )  # fmt: skip
                continue
            try:
                installed = self.redactor.update(rec.customer_id, rec.policy, rec.version)
            except PolicyConflict as exc:
                # A version named twice: an alarm, and the version held stays in force.
                metrics.POLICY_CONFLICTS.labels(rec.customer_id).inc()
                log.error("policy record at offset %s: %s", ev.message.offset, exc)
                continue
            if installed:
                log.info("policy v%s of %s in force", rec.version, rec.customer_id)
                metrics.POLICY_VERSION.labels(rec.customer_id).set(rec.version)


def _policies_high_watermark(settings: Settings) -> int:
    consumer = Consumer(consumer_config(settings, "mailmeta-policy-probe"))
    try:
        tp = TopicPartition(settings.policies_topic, POLICY_PARTITION)
        return int(consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1])
    finally:
        consumer.close()


class Transformer:
    """Turns a batch of raw records into the records to produce. No faust, no I/O."""

    def __init__(
        self, redactor: Redactor, settings: Settings, customers: Customers | None = None
    ) -> None:
        self.redactor = redactor
        # Every customer (the redactor may know only this region's): ids in dead letters.
        self.customers = customers if customers is not None else redactor.customers
        self.redacted = settings.redacted_topic
        self.deadletter = settings.deadletter_topic
        self.raw = settings.raw_topic
        self.partitions = settings.partitions

    def transform(
        self, records: Iterable[tuple[bytes | None, bytes, int, int]]
    ) -> list[tuple[str, bytes | None, bytes, int | None, Any]]:
        """(key, value, partition, offset) -> (topic, key, value, partition, headers)."""
        out: list[tuple[str, bytes | None, bytes, int | None, Any]] = []
        append = out.append
        compiled = self.redactor.compiled
        loads, dumps, JSONDecodeError = orjson.loads, orjson.dumps, orjson.JSONDecodeError
        served_elsewhere = self.customers.served_elsewhere  # region pinning
        n_ok = 0
        for key, value, partition, offset in records:
            if value[:11] == b'{"_control"':
                marker = control_of(value)
                if marker is not None:
                    # Forward the drain marker to every redacted partition, after everything
                    # this partition produced before it (same producer, so ordered).
                    body = encode_drain_marker(marker["nonce"], partition)
                    for q in range(self.partitions):
                        append((self.redacted, None, body, q, None))
                    continue
            obj = None
            try:
                try:
                    obj = loads(value)
                except JSONDecodeError as exc:
                    raise SchemaError(f"not JSON: {exc}") from None
                if not isinstance(obj, dict):
                    raise SchemaError("event is not a JSON object")
                if not plainly_valid(obj):
                    event_from_dict(obj)  # raises with the reason (and is the authority)
                cid = obj["customer_id"]
                away = served_elsewhere(cid)
                if away is not None:
                    raise ElsewhereError(away.reason())
                out_value = dumps(compiled(cid).apply_dict(obj))
            except (SchemaError, RedactionError) as exc:
                kind = "schema" if isinstance(exc, SchemaError) else "redaction"
                if isinstance(exc, ElsewhereError):
                    kind = "region"
                metrics.DEAD_LETTERS.labels(kind).inc()
                log.warning("dead letter at %s/%s: %s", partition, offset, exc)
                append(self._dead_letter(obj, str(exc)[:500], partition, offset))
                continue
            n_ok += 1
            append((self.redacted, key, out_value, None, None))
        if n_ok:
            metrics.REDACTED.inc(n_ok)
        return out

    def _dead_letter(
        self, obj: object, reason: str, partition: int, offset: int
    ) -> tuple[str, bytes | None, bytes, int | None, Any]:
        """The dead letter of a raw record: why, which event and where, never its payload
        (the unredacted record stays only in the raw topic, kept hours)."""
        letter = DeadLetter.of(obj, reason, (self.raw, partition, offset), self.customers.by_id)
        return (self.deadletter, letter.key(), letter.value(), None, letter.headers())


def create_app(settings: Settings) -> faust.App:
    customers = load_customers(settings.config, settings.region)
    redactor = regional_redactor(customers)
    for c in customers.here():
        metrics.POLICY_VERSION.labels(c.id).set(c.policy_version)
    # faust writes a datadir (cwd/"<id>-data" by default): nothing outside the data dir.
    settings.streams_dir().mkdir(parents=True, exist_ok=True)
    app = BatchApp(
        settings.group_id(APP_ID),
        datadir=str(settings.streams_dir()),
        **faust_broker_options(settings),
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_allow_declare=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=1.0,
        producer_linger=0.01,
        producer_max_batch_size=1 << 20,
        producer_acks=-1,
        # Per partition and fetch. At faust's 1 MiB, aiokafka on Tansu got ~5k records a
        # round trip and spent most of the run waiting for the next fetch.
        consumer_max_fetch_size=8 << 20,
    )
    raw = app.topic(settings.raw_topic, value_serializer="raw", key_serializer="raw")
    policies_topic = app.topic(
        settings.policies_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=1,
    )
    table = app.tables.add(
        PolicyTable(
            app,
            name="policies",
            topic_name=settings.policies_topic,
            redactor=redactor,
            customers=customers,
            key_type=bytes,
            value_type=bytes,
            partitions=1,
            changelog_topic=policies_topic,
            is_global=True,
            # Others write the topic (the sink's API): read all of it as standby too.
            synchronize_all_active_partitions=True,
            # Apply each change as it comes; the faust docs' fix for global-table
            # recovery loops with several workers.
            standby_buffer_size=1,
            recovery_buffer_size=1,
        )
    )
    transformer = Transformer(redactor, settings, customers)
    policies_ready = asyncio.Event()

    @app.task
    async def wait_for_policies() -> None:
        # Redact nothing until the table has read up to the end seen now, so a restarted
        # worker never applies an older, looser policy. On Apache Kafka faust's recovery
        # already ends there; Tansu's wrong ListOffsets answers end it early, so the check
        # stays (it costs one ListOffsets at start).
        loop = asyncio.get_running_loop()
        high = await loop.run_in_executor(None, _policies_high_watermark, settings)
        # Tansu may answer 0 for a topic written a moment ago, and the storage owner has
        # always written one record by now: ask again briefly (Apache Kafka answers at once).
        retry_until = loop.time() + 3.0
        while high == 0 and loop.time() < retry_until:
            await asyncio.sleep(0.2)
            high = await loop.run_in_executor(None, _policies_high_watermark, settings)
        deadline = loop.time() + POLICY_CATCH_UP_S
        while table.applied_offset + 1 < high:
            if loop.time() > deadline:
                log.error(
                    "policy table read to offset %s of %s after %ss; still waiting",
                    table.applied_offset + 1, high, POLICY_CATCH_UP_S,
                )  # fmt: skip
                deadline = loop.time() + POLICY_CATCH_UP_S
            await asyncio.sleep(0.05)
        log.info("policies loaded (%s records); redacting", high)
        policies_ready.set()

    sender = AsyncProducer(producer_config(settings, **{"batch.size": 1 << 20}), name="streams")

    async def handle(records: list[tuple[bytes | None, bytes, int, int]]) -> asyncio.Future[None]:
        # At-least-once: the batch's offsets are acked (and committed) only once every
        # output record is acknowledged by the broker (the future this returns); the
        # consumer goes on with the next batch meanwhile. One producer, so a drain marker
        # still follows the events before it in each partition.
        # Slices: output of the first is on its way while the next is transformed, and
        # the event loop (fetches, heartbeats, the policy table) is never held for long.
        done = []
        for i in range(0, len(records), SLICE):
            if i:
                await asyncio.sleep(0)
            done.append(await sender.send_batch(transformer.transform(records[i : i + SLICE])))
        return done[0] if len(done) == 1 else asyncio.ensure_future(_all(done))

    @app.task
    async def start_sender() -> None:
        sender.start()

    @app.on_before_shutdown.connect
    async def stop_sender(_app: Any, **_kw: Any) -> None:
        left = await asyncio.get_running_loop().run_in_executor(None, sender.stop)
        if left:
            log.warning("%s output records not acknowledged at shutdown (read again)", left)

    monitor = metrics.BacklogMonitor(settings, settings.group_id(APP_ID))

    @app.task
    async def watch_raw_backlog() -> None:
        # Every worker watches the whole raw topic (cheap: offsets and one record per
        # lagging partition), so the age is there even while its own partitions are fine.
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, monitor.check)
            except Exception as exc:  # a broker hiccup: keep the last value, try again
                log.warning("could not measure the raw backlog: %s", exc)
            await asyncio.sleep(metrics.CHECK_EVERY_S)

    # What this worker applies, for the API's "applied by k of n workers" (policy/_applied.py).
    status = PolicyStatusReporter(settings, customers, redactor, table)

    @app.task
    async def report_policy_status() -> None:
        await status.run(policies_ready)

    @app.on_before_shutdown.connect
    async def withdraw_policy_status(_app: Any, **_kw: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, status.stop)

    app.batch_agent(raw, handle)
    app.batch_gate(policies_ready)
    if settings.streams_metrics_port:

        @app.task
        async def serve_metrics() -> None:
            # Started with the worker (a server started before faust's worker runs does
            # not survive its start-up).
            metrics.serve(settings.streams_metrics_port, settings.api_host)

    return app
