"""The front end's producer: :class:`mailmeta.kafka.AsyncProducer` on the raw topic, its
failures as :class:`DeliveryError` whose text is safe to quote in an SMTP reply."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from mailmeta.kafka import AsyncProducer, discard_futures

DEFAULT_DELIVERY_TIMEOUT = 10.0


class DeliveryError(Exception):
    """The broker did not acknowledge a record; ``str()`` is a short, header-free reason."""


def ingest_overrides(delivery_timeout: float) -> dict[str, Any]:
    """The front end's own producer settings, on top of ``mailmeta.kafka.producer_config``."""
    return {
        # Bounds how long an SMTP client waits for its 250/451.
        "message.timeout.ms": int(delivery_timeout * 1000),
        # Reconnect quickly once the broker is back: SMTP clients retry within minutes.
        "reconnect.backoff.max.ms": 2000,
        "client.id": "mailmeta-ingest",
    }


class EventProducer:
    """Sends encoded events and awaits the broker's acknowledgement of each."""

    def __init__(
        self,
        base_config: dict[str, Any],
        topic: str,
        *,
        delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        """``base_config``: ``mailmeta.kafka.producer_config(settings)`` (idempotent, acks=all)."""
        self.topic = topic
        self.delivery_timeout = delivery_timeout
        config = {**base_config, **ingest_overrides(delivery_timeout)}
        config["logger"] = logging.getLogger("mailmeta.ingest.librdkafka")
        config.update(extra_config or {})
        self._kafka = AsyncProducer(config, name="ingest", error=_delivery_error)

    def start(self) -> None:
        """Bind to the running loop and start the delivery-report thread."""
        self._kafka.start()

    async def warm_up(self, wait: float = 2.0) -> bool:
        """Fetch the topic's metadata once (see :meth:`AsyncProducer.warm_up`)."""
        return await self._kafka.warm_up(self.topic, wait)

    def queued(self) -> int:
        """Records handed to the producer and not yet acknowledged or failed."""
        return self._kafka.queued()

    def send(self, records: Sequence[tuple[bytes, bytes]]) -> list[asyncio.Future[None]]:
        """Enqueue ``(key, value)`` records; one future per record settles with the broker's
        acknowledgement (or a :class:`DeliveryError`). Raises DeliveryError if the local
        queue refuses them."""
        try:
            return self._kafka.send(self.topic, records)
        except BufferError:
            raise DeliveryError("producer queue is full") from None
        except KafkaException as exc:
            raise DeliveryError(_reason(exc.args[0])) from None

    async def deliver(self, records: Sequence[tuple[bytes, bytes]]) -> None:
        """Produce ``(key, value)`` records and return once the broker acknowledged all of
        them; raise :class:`DeliveryError` on the first failure or after the timeout."""
        futures = self.send(records)
        # librdkafka times each record out after message.timeout.ms; this guard only covers
        # a poll thread that stopped serving reports.
        _done, pending = await asyncio.wait(futures, timeout=self.delivery_timeout + 5.0)
        if pending:
            discard_futures(futures)
            raise DeliveryError("timed out waiting for the event store")
        first: BaseException | None = None
        for fut in futures:
            failure = fut.exception()  # read every one: none is left "never retrieved"
            if failure is not None and first is None:
                first = failure
        if first is not None:
            raise first

    def flush(self, timeout: float) -> int:
        """Blocking: wait up to ``timeout`` s for queued records; returns how many remain."""
        return self._kafka.flush(timeout)

    async def aclose(self, flush_timeout: float = 5.0) -> None:
        """Stop the poll thread, then flush (bounded) off the loop so reports still settle."""
        await self._kafka.aclose(flush_timeout)


def _delivery_error(err: KafkaError) -> DeliveryError:
    return DeliveryError(_reason(err))


def _reason(err: object) -> str:
    text = err.str() if isinstance(err, KafkaError) else str(err)
    # It ends up in an SMTP reply line: printable ASCII, bounded.
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return text[:200] or "unknown error"
