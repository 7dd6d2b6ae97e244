"""Build and run the SMTP front end on the running event loop (no threaded Controller), so
that it can stop gracefully: stop accepting, let transactions finish, flush the producer."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from aiosmtpd.smtp import SMTP

from mailmeta.config import Customers, Settings
from mailmeta.ingest._handler import DEFAULT_MAX_RECIPIENTS, IngestHandler, Spool
from mailmeta.ingest._producer import DEFAULT_DELIVERY_TIMEOUT, EventProducer

log = logging.getLogger("mailmeta.ingest")

DATA_SIZE_LIMIT = 32 * 1024 * 1024  # advertised in EHLO as SIZE
SHUTDOWN_GRACE = 8.0
FLUSH_TIMEOUT = 5.0
_GOODBYE = b"421 4.3.2 Service shutting down, try again later\r\n"


class _OnlyWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_aiosmtpd_log() -> None:
    """aiosmtpd logs every command line at INFO and every DATA line (the body) at DEBUG on
    the ``mail.log`` logger. A filter, unlike a level, survives anyone (a test's caplog, an
    operator's DEBUG) lowering levels, so nothing below WARNING leaves that logger."""
    logger = logging.getLogger("mail.log")
    if not any(isinstance(f, _OnlyWarnings) for f in logger.filters):
        logger.addFilter(_OnlyWarnings())


class _SMTP(SMTP):
    """aiosmtpd's protocol, registering itself so shutdown can see live connections."""

    def __init__(self, handler: Any, *, connections: set[_SMTP], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._connections = connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._connections.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._connections.discard(self)
        super().connection_lost(error)

    @property
    def in_transaction(self) -> bool:
        # MAIL accepted and DATA not yet answered (aiosmtpd resets the envelope only after
        # the DATA handler returned and writes the reply without yielding in between).
        return self.envelope is not None and self.envelope.mail_from is not None


class IngestServer:
    """The SMTP front end as an async context manager::

    async with IngestServer(settings, customers) as srv:
        ...  # srv.port is bound; stop() runs on exit
    """

    def __init__(
        self,
        settings: Settings,
        customers: Customers,
        *,
        host: str | None = None,
        port: int | None = None,
        hostname: str | None = None,
        data_size_limit: int = DATA_SIZE_LIMIT,
        delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        spool: Spool | None = None,
        producer_config: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.customers = customers
        self.host = settings.smtp_host if host is None else host
        self._port = settings.smtp_port if port is None else port
        # Once, here: aiosmtpd would otherwise call socket.getfqdn() (DNS) per connection.
        self.hostname = hostname or socket.gethostname()
        self.data_size_limit = data_size_limit
        self.producer = EventProducer(
            settings.kafka_bootstrap,
            settings.raw_topic,
            delivery_timeout=delivery_timeout,
            extra_config=producer_config,
        )
        self.handler = IngestHandler(
            customers, self.producer, spool=spool, max_recipients=max_recipients
        )
        self._connections: set[_SMTP] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        quiet_aiosmtpd_log()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> _SMTP:
        assert self._loop is not None
        return _SMTP(
            self.handler,
            connections=self._connections,
            hostname=self.hostname,
            ident="mailmeta ESMTP",  # not aiosmtpd's name and version
            data_size_limit=self.data_size_limit,
            decode_data=False,
            loop=self._loop,
        )

    async def start(self) -> IngestServer:
        self._loop = asyncio.get_running_loop()
        self.producer.start()
        await self.producer.warm_up()
        try:
            self._server = await self._loop.create_server(
                self._protocol, host=self.host, port=self._port, reuse_address=True
            )
        except BaseException:
            await self.producer.aclose(flush_timeout=1.0)
            raise
        log.info("SMTP listening on %s:%d", self.host, self.port)
        return self

    async def stop(
        self, grace: float = SHUTDOWN_GRACE, flush_timeout: float = FLUSH_TIMEOUT
    ) -> None:
        """Stop accepting, let transactions in flight finish (up to ``grace`` s), close idle
        connections with a 421, then flush the producer (up to ``flush_timeout`` s)."""
        server, self._server = self._server, None
        if server is None:
            return
        loop = asyncio.get_running_loop()
        self.handler.shutting_down = True
        server.close()
        deadline = loop.time() + grace
        while self._connections:
            for proto in list(self._connections):
                transport = proto.transport
                if transport is None or transport.is_closing():
                    continue
                if not proto.in_transaction:
                    transport.write(_GOODBYE)  # type: ignore[attr-defined]
                    transport.close()
            if loop.time() >= deadline:
                busy = [p for p in self._connections if p.in_transaction]
                if busy:
                    log.warning("aborting %d transaction(s) still open at shutdown", len(busy))
                for proto in list(self._connections):
                    if proto.transport is not None:
                        proto.transport.abort()  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        # Let connection_lost callbacks run before the server object goes away.
        await asyncio.sleep(0)
        try:
            await asyncio.wait_for(server.wait_closed(), 1.0)
        except TimeoutError:
            pass
        await self.producer.aclose(flush_timeout=flush_timeout)
        log.info("SMTP server stopped")

    async def __aenter__(self) -> IngestServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
