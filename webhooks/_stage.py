"""The webhook stage: redacted topic -> durable per-endpoint queue (store) -> signed POSTs.

Two threads. The consumer (its own group on the *redacted* topic: a webhook carries what the
customer's policy stores, never more) matches each event to its customer's endpoints, writes
the rows to the store's outbox, and only then commits the offsets: a SIGKILL at any point
loses nothing (uncommitted records are read again; rows already queued are not queued twice).
The delivery thread runs an asyncio loop with one worker per endpoint that has pending rows:
each sends its oldest batch, and the next only once that one is settled (delivered, or failed
past the retry horizon), so a message's events arrive in order; a slow or dead endpoint only
waits on itself (its own backoff is its circuit breaker), and a global limit bounds requests
in flight.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from mailmeta.config import NetworkGuard, Settings
from mailmeta.kafka import consumer_config
from mailmeta.schema import Event, SchemaError, control_of, decode_event, parse_time
from mailmeta.store import OutboxRow, Store, WebhookEndpoint, webhook_payload
from mailmeta.webhooks import _metrics as metrics
from mailmeta.webhooks._send import Outcome, Sender, signature, webhook_id

log = logging.getLogger("mailmeta.webhooks")

GROUP_ID = "mailmeta-webhooks"
_MAX_RECORDS = 2000
_MAX_WAIT = 0.2  # seconds a consumed record waits for company before it is queued
_ENDPOINTS_TTL = 2.0  # how stale the consumer's view of endpoints may be
# The delivery loop scans the whole outbox for pending rows this often (and when woken without
# endpoints: a replay, start-up); rows this stage queued start their endpoint's worker at once.
_SCAN_S = 5.0
EVENT_TYPE = "mailmeta.events"


def body_of(rows: list[OutboxRow], at: datetime) -> bytes:
    events = [orjson.loads(r.payload) for r in rows]
    return orjson.dumps(
        {
            "type": EVENT_TYPE,
            "timestamp": at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "replay": bool(rows[0].replay_id),
            "data": {"events": events},
        }
    )


@dataclass
class StageStats:
    state: str = "starting"
    queued: int = 0
    delivered: int = 0
    failed: int = 0
    attempts: int = 0
    last_error: str | None = None


class WebhookStage:
    def __init__(self, settings: Settings, store: Store, *, group_id: str | None = None) -> None:
        self._settings = settings
        self._store = store
        self._group_id = group_id or settings.group_id(GROUP_ID)
        self._guard = NetworkGuard.parse(settings.webhook_allow_networks)
        self._stopping = threading.Event()
        self._consumer_thread: threading.Thread | None = None
        self._delivery_thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._endpoints: dict[str, list[WebhookEndpoint]] = {}
        self._endpoints_at = 0.0
        self._loaded_wall = datetime.min.replace(tzinfo=UTC)
        self._hot: set[str] = set()
        self._scan = True
        self._hot_lock = threading.Lock()
        self._again: set[str] = set()  # the delivery loop's own (one thread)
        self.stats = StageStats()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> WebhookStage:
        ready = threading.Event()
        self._delivery_thread = threading.Thread(
            target=self._deliver_main, args=(ready,), name="mailmeta-webhooks-delivery", daemon=True
        )
        self._delivery_thread.start()
        ready.wait(10)
        self._consumer_thread = threading.Thread(
            target=self._consume_main, name="mailmeta-webhooks-consumer", daemon=True
        )
        self._consumer_thread.start()
        self.stats.state = "running"
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)
        for t in (self._consumer_thread, self._delivery_thread):
            if t is not None:
                t.join(timeout)
        self.stats.state = "stopped"

    @property
    def alive(self) -> bool:
        return all(
            t is not None and t.is_alive() for t in (self._consumer_thread, self._delivery_thread)
        )

    def wake(self, endpoints: set[str] | None = None) -> None:
        """Deliver now: for ``endpoints`` (rows were queued for them), or after a scan of the
        whole outbox (None: a replay was queued elsewhere)."""
        with self._hot_lock:
            if endpoints is None:
                self._scan = True
            else:
                self._hot |= endpoints
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    # --- consuming ---------------------------------------------------------------------------

    def _refresh_endpoints(self, newest_received: datetime | None) -> None:
        """Reload the endpoints when stale, or when an event is newer than the last load: an
        endpoint gets every event received after it was created (earlier ones: replay)."""
        now = time.monotonic()
        stale = now - self._endpoints_at > _ENDPOINTS_TTL
        if stale or (newest_received is not None and newest_received >= self._loaded_wall):
            wall = datetime.now(UTC)
            by: dict[str, list[WebhookEndpoint]] = {}
            for e in self._store.webhook_endpoints():
                by.setdefault(e.customer_id, []).append(e)
            self._endpoints, self._endpoints_at, self._loaded_wall = by, now, wall

    def _consume_main(self) -> None:
        s = self._settings
        consumer = Consumer(
            consumer_config(s, self._group_id, logger=logging.getLogger("mailmeta.webhooks.kafka"))
        )
        consumer.subscribe([s.redacted_topic])
        try:
            while not self._stopping.is_set():
                msgs = consumer.consume(num_messages=_MAX_RECORDS, timeout=_MAX_WAIT)
                if msgs:
                    self._queue_and_commit(consumer, msgs)
        except Exception as exc:
            log.exception("webhook consumer failed")
            self.stats.state = "failed"
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            consumer.close()

    def _queue_and_commit(self, consumer: Consumer, msgs: list[Message]) -> None:
        offsets: dict[tuple[str, int], int] = {}
        rows: list[OutboxRow] = []
        chunk = time.time_ns()
        now = datetime.now(UTC)
        events: list[Event] = []
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF and err.fatal():
                    raise KafkaException(err)
                continue
            offsets[(msg.topic() or "", msg.partition() or 0)] = (msg.offset() or 0) + 1
            value = msg.value() or b""
            try:
                if control_of(value) is not None:
                    continue
                events.append(decode_event(value))
            except (SchemaError, orjson.JSONDecodeError):
                continue  # the sink dead-letters it; nothing a customer could be sent
        if events:
            self._retry(
                lambda: self._refresh_endpoints(max(parse_time(e.received_at) for e in events))
            )
        for event in events:
            wanted = [
                e for e in self._endpoints.get(event.customer_id, []) if e.wants(event.status)
            ]
            if not wanted:
                continue
            payload = webhook_payload(event.to_dict())
            for e in wanted:
                rows.append(
                    OutboxRow(
                        e.endpoint_id,
                        event.event_id,
                        event.customer_id,
                        payload,
                        chunk,
                        len(rows),
                        now,
                    )
                )
        if rows:
            self._retry(lambda: self._store.enqueue_webhooks(rows))
            self.stats.queued += len(rows)
            self.wake({r.endpoint_id for r in rows})
        # Only now: every endpoint's share of these records is durable in the outbox.
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        if tps:
            try:
                consumer.commit(offsets=tps, asynchronous=False)
            except KafkaException as exc:
                # Read again by whoever owns the partition now: queued rows are not re-queued.
                log.warning("commit failed: %s", exc)

    def _retry(self, fn: Callable[[], object]) -> None:
        delay = 0.1
        while True:
            try:
                fn()
                return
            except Exception as exc:
                self.stats.last_error = f"store: {exc}"
                log.warning("queueing webhook rows failed, retrying in %.1fs: %s", delay, exc)
                if self._stopping.wait(delay):
                    raise
                delay = min(delay * 2, 5.0)

    # --- delivering --------------------------------------------------------------------------

    def _deliver_main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._deliver(ready))
        finally:
            loop.close()

    async def _deliver(self, ready: threading.Event) -> None:
        s = self._settings
        self._wake = asyncio.Event()
        sender = Sender(self._guard, s.webhook_timeout_s, s.webhook_max_response_bytes)
        limit = asyncio.Semaphore(s.webhook_concurrency)
        workers: dict[str, asyncio.Task[None]] = {}
        ready.set()
        try:
            while not self._stopping.is_set():
                with self._hot_lock:
                    due, scan, self._hot, self._scan = self._hot, self._scan, set(), False
                if scan:
                    try:
                        backlog = await asyncio.to_thread(self._store.webhook_backlog)
                        due |= set(backlog)
                        now = datetime.now(UTC)
                        for endpoint_id in set(workers) | set(backlog):
                            oldest = backlog.get(endpoint_id, (0, now))[1]
                            age = max(0.0, (now - oldest).total_seconds())
                            metrics.PENDING_AGE.labels(endpoint_id).set(age)
                    except Exception as exc:
                        log.warning("reading the webhook backlog failed: %s", exc)
                        self._scan = True
                for endpoint_id in due:
                    task = workers.get(endpoint_id)
                    if task is None or task.done():
                        workers[endpoint_id] = asyncio.create_task(
                            self._worker(endpoint_id, sender, limit)
                        )
                    else:
                        # It may have just found nothing pending: it looks again before it ends.
                        self._again.add(endpoint_id)
                try:
                    await asyncio.wait_for(self._wake.wait(), _SCAN_S)
                except TimeoutError:
                    self._scan = True
                self._wake.clear()
        finally:
            for task in workers.values():
                task.cancel()
            await asyncio.gather(*workers.values(), return_exceptions=True)
            await sender.close()

    async def _worker(self, endpoint_id: str, sender: Sender, limit: asyncio.Semaphore) -> None:
        """Send the endpoint's batches in order until none is pending."""
        s = self._settings
        while not self._stopping.is_set():
            self._again.discard(endpoint_id)
            endpoint = await asyncio.to_thread(self._store.webhook_endpoint, endpoint_id)
            rows = await asyncio.to_thread(
                self._store.pending_webhooks, endpoint_id, s.webhook_batch_max
            )
            if not rows:
                if endpoint_id in self._again:
                    continue  # rows were queued while this looked
                return
            if endpoint is None:
                # Deleted: its queue goes to the failure log rather than nowhere.
                await asyncio.to_thread(
                    self._store.settle_webhooks,
                    rows,
                    "failed",
                    attempts=0,
                    last_status=0,
                    last_error="endpoint deleted",
                    webhook_id="",
                )
                continue
            if not endpoint.active:
                return  # paused: its rows wait (the scan looks again) until it is reactivated
            await self._send_batch(endpoint, rows, sender, limit)

    async def _send_batch(
        self,
        endpoint: WebhookEndpoint,
        rows: list[OutboxRow],
        sender: Sender,
        limit: asyncio.Semaphore,
    ) -> None:
        s = self._settings
        msg_id = webhook_id(endpoint.endpoint_id, [r.event_id for r in rows], rows[0].replay_id)
        give_up = min(r.created_at for r in rows) + timedelta(seconds=s.webhook_retry_horizon_s)
        attempt = 0
        outcome = Outcome(False, error="not sent")
        while not self._stopping.is_set():
            attempt += 1
            now = datetime.now(UTC)
            body = body_of(rows, now)
            headers = {
                "webhook-id": msg_id,
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": signature(endpoint.secrets(now), msg_id, now, body),
            }
            async with limit:
                outcome = await sender.post(endpoint.url, body, headers)
            self.stats.attempts += 1
            label = f"{outcome.status // 100}xx" if outcome.status else "error"
            metrics.ATTEMPTS.labels(endpoint.endpoint_id, label).inc()
            metrics.LATENCY.observe(outcome.latency_s)
            if outcome.ok:
                await asyncio.to_thread(
                    self._store.settle_webhooks,
                    rows,
                    "delivered",
                    attempts=attempt,
                    last_status=outcome.status,
                    last_error="",
                    webhook_id=msg_id,
                )
                self.stats.delivered += len(rows)
                metrics.DELIVERED.labels(endpoint.endpoint_id).inc(len(rows))
                return
            delay = min(s.webhook_retry_max_s, s.webhook_retry_base_s * 2 ** (attempt - 1))
            delay = random.uniform(delay / 2, delay)  # jitter: retries of many do not align
            if outcome.retry_after is not None:
                delay = max(delay, min(outcome.retry_after, s.webhook_retry_max_s))
            if datetime.now(UTC) + timedelta(seconds=delay) > give_up:
                break
            log.info(
                "webhook %s to endpoint %s failed (%s), attempt %d, retrying in %.1fs",
                msg_id,
                endpoint.endpoint_id,
                outcome.error,
                attempt,
                delay,
            )
            # Re-read the endpoint on the way (a rotated secret, a changed URL, deactivation).
            if await self._sleep(delay):
                return
            fresh = await asyncio.to_thread(self._store.webhook_endpoint, endpoint.endpoint_id)
            if fresh is None:
                return  # the worker's next turn logs the rows as failed
            endpoint = fresh
        if self._stopping.is_set():
            return
        log.warning(
            "webhook %s to endpoint %s failed for good after %d attempts: %s",
            msg_id,
            endpoint.endpoint_id,
            attempt,
            outcome.error,
        )
        await asyncio.to_thread(
            self._store.settle_webhooks,
            rows,
            "failed",
            attempts=attempt,
            last_status=outcome.status,
            last_error=outcome.error,
            webhook_id=msg_id,
        )
        self.stats.failed += len(rows)
        metrics.FAILED.labels(endpoint.endpoint_id).inc(len(rows))

    async def _sleep(self, seconds: float) -> bool:
        """Wait; True when the stage is stopping."""
        end = time.monotonic() + seconds
        while not self._stopping.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, 0.5))
        return True
