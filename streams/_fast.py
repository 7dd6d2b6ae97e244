"""A faust App whose batch agents receive each fetched batch of a topic whole.

faust hands a worker's records to agents one by one: per record a Message, a conductor
lookup under a lock, two tasks (``wait_first``), an Event, stream bookkeeping and an ack.
That, not the redaction, caps a faust worker near 3-10k events/s (DESIGN.md). Here the
consumer's drain loop passes the records of a *batch topic* to its handler as one list
and acks their offsets in one step; every other topic (the policy table's changelog, the
assignor's) takes faust's normal path.

faust still owns everything else: the consumer group and its assignor, the agent the
topic belongs to (so subscription and rebalancing are faust's), offsets and commits, the
producer, and the tables.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import faust
from faust.transport.consumer import ack_lock
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode import Service

Record = tuple[bytes | None, bytes, int, int]  # key, value, partition, offset
# Returns None when done with the batch, or a future that resolves when it is (its outputs
# acknowledged): the consumer goes on with the next batch meanwhile and acks this one then.
BatchHandler = Callable[[list[Record]], Awaitable["asyncio.Future[None] | None"]]

# Batches whose outputs may be unacknowledged at once (bounds memory and redelivery).
MAX_IN_FLIGHT = 8


class BatchConsumer(faust_aiokafka.Consumer):
    _in_flight: deque[asyncio.Future[None]] | None = None
    _delivery_error: BaseException | None = None

    @property
    def batch_handlers(self) -> dict[str, BatchHandler]:
        return cast(dict[str, BatchHandler], self.app.__dict__.get("_batch_handlers", {}))

    @property
    def batch_gate(self) -> asyncio.Event | None:
        return cast("asyncio.Event | None", self.app.__dict__.get("_batch_gate"))

    async def _handle(self, handler: BatchHandler, tp: Any, fresh: list[Any]) -> None:
        r_offset = self._read_offset[tp]
        first = fresh[0].offset
        if r_offset is not None and first - r_offset > 1:
            await self._add_gap(tp, r_offset + 1, first)
        done = await handler([(r.key, r.value, r.partition, r.offset) for r in fresh])
        offsets = [r.offset for r in fresh]
        self._read_offset[tp] = offsets[-1]
        if done is None:
            self._ack_offsets(tp, offsets)
            return
        in_flight = self._in_flight
        if in_flight is None:
            in_flight = self._in_flight = deque()
        done.add_done_callback(lambda f: self._on_batch_done(f, tp, offsets))
        in_flight.append(done)
        while in_flight and in_flight[0].done():
            in_flight.popleft()
        if len(in_flight) > MAX_IN_FLIGHT:
            await asyncio.wait([in_flight.popleft()])
        self._raise_delivery_error()

    def _on_batch_done(self, fut: asyncio.Future[None], tp: Any, offsets: list[int]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            # Not acked, so never committed: the batch is read again after a restart.
            self._delivery_error = self._delivery_error or exc
            return
        self._ack_offsets(tp, offsets)

    def _raise_delivery_error(self) -> None:
        if self._delivery_error is not None:
            raise self._delivery_error

    async def wait_empty(self) -> None:
        # Before a rebalance's (or the shutdown's) commit: let outputs in flight be
        # acknowledged so their batches' offsets are committed too.
        while self._in_flight:
            await asyncio.wait([self._in_flight.popleft()])
        await super().wait_empty()

    def _ack_offsets(self, tp: Any, offsets: list[int]) -> None:
        # What Consumer.ack does per message, once for the whole batch.
        with ack_lock:
            committed = self._committed_offset[tp]
            index = self._acked_index[tp]
            acked = self._acked[tp]
            n = 0
            for offset in offsets:
                if (committed is None or offset >= committed) and offset not in index:
                    index.add(offset)
                    acked.append(offset)
                    n += 1
            self._n_acked += n

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - hot loop
        handlers = self.batch_handlers
        callback = self.callback
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        to_message = self._to_message
        consumer_stopped = cast(Service, self)._stopped.is_set
        fetcher_stopped = cast(Service, fetcher)._stopped.is_set
        # Batches fetched before the gate opened; their partitions are paused meanwhile,
        # while other topics (the table's changelog) keep flowing.
        held: list[tuple[BatchHandler, Any, list[Any]]] = []
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                gate = self.batch_gate
                if held and (gate is None or gate.is_set()):
                    generation = self.app.consumer_generation_id
                    self.resume_partitions({TP(tp.topic, tp.partition) for _h, tp, _r in held})
                    for handler, tp, fresh in held:
                        if generation == self.app.consumer_generation_id:
                            await self._handle(handler, tp, fresh)
                    held = []
                self._raise_delivery_error()
                records, _active = await self._wait_next_records(1.0)
                await asyncio.sleep(0)
                if not records or self.should_stop:
                    continue
                generation = self.app.consumer_generation_id
                for tp, recs in records.items():
                    if not self.flow_active or generation != self.app.consumer_generation_id:
                        held = []
                        break  # a rebalance began: these records are fetched again after it
                    r_offset = get_read_offset(tp)
                    # >=, as faust's own loop: after a seek (start, rebalance) the read offset
                    # is the committed one, i.e. the *next* record to read; ">" skipped it, and
                    # so lost one record per partition at every worker start.
                    fresh = [r for r in recs if r_offset is None or r.offset >= r_offset]
                    if not fresh:
                        continue
                    found = handlers.get(tp.topic)
                    if found is None:
                        for r in fresh:
                            await callback(to_message(tp, r))
                            set_read_offset(tp, r.offset)
                        continue
                    gate = self.batch_gate
                    if held or (gate is not None and not gate.is_set()):
                        held.append((found, tp, fresh))
                        self.pause_partitions({TP(tp.topic, tp.partition)})
                        continue
                    await self._handle(found, tp, fresh)
                    if self._commit_every is not None and self._n_acked >= self._commit_every:
                        self._n_acked = 0
                        await self.commit()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise


class BatchTransport(faust_aiokafka.Transport):
    Consumer = BatchConsumer


class BatchApp(faust.App):
    """A faust App with :meth:`batch_agent`."""

    def _new_transport(self) -> Any:
        return BatchTransport(self.conf.broker_consumer, self)

    def batch_gate(self, gate: asyncio.Event) -> None:
        """Batch topics wait (paused, their fetched batch held) until ``gate`` is set."""
        self.__dict__["_batch_gate"] = gate

    def batch_agent(self, topic: Any, handler: BatchHandler) -> None:
        """Records of ``topic`` go to ``handler`` a fetched batch at a time; their offsets
        are acked when it returns None, or when the future it returns resolves (so only
        once it has finished with them: at-least-once)."""
        name = topic.get_topic_name()
        handlers = self.__dict__.setdefault("_batch_handlers", {})
        handlers[name] = handler

        # The agent makes faust subscribe to the topic and own its partitions; records
        # never reach its stream (the consumer hands them to ``handler``).
        async def owner(stream: Any) -> None:
            async for _ev in stream.events():  # pragma: no cover - never delivered
                pass

        self.agent(topic, name=f"mailmeta.streams.batch.{name}")(owner)
