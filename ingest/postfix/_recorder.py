"""Events to the raw topic the way the SMTP front end records them: acknowledged by the
broker, else fsync'd in a durable spool that is replayed in order once the broker is back.

The logic is the front end's own (:meth:`IngestHandler.record`, :func:`replay_forever`);
this only owns the producer, the spool and the replay task for a process that is not an
SMTP server (the milter, the log follower).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from mailmeta import schema
from mailmeta.config import DEFAULT_REGION, Customers, Settings
from mailmeta.ingest._handler import IngestHandler
from mailmeta.ingest._producer import EventProducer
from mailmeta.ingest._spool import Spool, replay_forever
from mailmeta.kafka import producer_config

log = logging.getLogger("mailmeta.ingest.postfix")


class Recorder:
    def __init__(self, settings: Settings, customers: Customers, spool_name: str) -> None:
        self.producer = EventProducer(producer_config(settings), settings.raw_topic)
        self.spool: Spool | None = None
        if settings.ingest_spool_max_bytes > 0:
            region = "" if settings.region == DEFAULT_REGION else f".{settings.region}"
            directory: Path = settings.data_dir / f"spool{region}" / spool_name
            self.spool = Spool(directory, settings.ingest_spool_max_bytes)
        self._handler = IngestHandler(
            customers, self.producer, spool=self.spool, spool_after=settings.ingest_spool_after_s
        )
        self._replayer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.spool is not None:
            left = self.spool.open()
            if left:
                log.warning("spool %s holds %d event(s) from an earlier run: replaying",
                            self.spool.directory, left)  # fmt: skip
        self.producer.start()
        await self.producer.warm_up()
        if self.spool is not None:
            self._replayer = asyncio.get_running_loop().create_task(
                replay_forever(
                    self.spool,
                    self.producer.deliver,
                    ready=lambda: self.producer.queued() == 0,
                    skip=self._handler.late_acked,
                )
            )

    async def record(self, events: list[schema.Event]) -> str | None:
        """Durable (broker or spool) -> None; else a short reason."""
        if not events:
            return None
        records = [(ev.event_id.encode(), schema.encode_event(ev)) for ev in events]
        return await self._handler.record(records)

    async def aclose(self, flush_timeout: float = 5.0) -> None:
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
            self._replayer = None
        await self.producer.aclose(flush_timeout=flush_timeout)
        if self.spool is not None:
            await self.spool.aclose()
