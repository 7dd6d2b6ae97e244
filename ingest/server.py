"""Build and run the SMTP front end on the running event loop (no threaded Controller), so
that it can stop gracefully: stop accepting, let transactions finish, flush the producer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from mailmeta.config import DEFAULT_REGION, Customers, Settings
from mailmeta.ingest import _metrics as metrics
from mailmeta.ingest._auth import Authenticator, RelayAccess, parse_networks
from mailmeta.ingest._handler import IngestHandler
from mailmeta.ingest._producer import DEFAULT_DELIVERY_TIMEOUT, EventProducer
from mailmeta.ingest._protocol import FrontEndSMTP, Shared
from mailmeta.ingest._spool import Record, Spool, encode_frame, replay_forever
from mailmeta.ingest._tls import client_context, self_signed, server_context
from mailmeta.kafka import producer_config as kafka_producer_config

log = logging.getLogger("mailmeta.ingest")

DATA_SIZE_LIMIT = 32 * 1024 * 1024  # the default, advertised in EHLO as SIZE
SHUTDOWN_GRACE = 8.0
FLUSH_TIMEOUT = 5.0
_GOODBYE = b"421 4.3.2 Service shutting down, try again later\r\n"


# aiosmtpd's warning for a command it does not know logs the whole first word of the line:
# for "MAIL_FROM:<alice@example.org>" an address, and whatever control bytes it holds.
_UNRECOGNISED = "%r unrecognised: %s"
_COMMAND_WORD_MAX = 16
_WORD_END = re.compile(r"[:<@\s]")


def command_word(text: str) -> str:
    """What a log may say of a client's unknown command: the word before any ``:``, ``<``,
    ``@`` or space, at most 16 characters, anything but printable ASCII escaped."""
    word = _WORD_END.split(text, maxsplit=1)[0]
    cut = word[:_COMMAND_WORD_MAX]
    shown = "".join(ch if " " < ch <= "~" and ch != "\\" else f"\\x{ord(ch):02x}" for ch in cut)
    return shown + ("…" if len(text) > len(cut) else "")


class _OnlyWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if record.msg == _UNRECOGNISED and isinstance(record.args, tuple) and record.args:
            record.args = (*record.args[:-1], command_word(str(record.args[-1])))
        return True


def quiet_aiosmtpd_log() -> None:
    """aiosmtpd logs every command line at INFO and every DATA line (the body) at DEBUG on
    the ``mail.log`` logger. A filter, unlike a level, survives anyone (a test's caplog, an
    operator's DEBUG) lowering levels, so nothing below WARNING leaves that logger. The
    level is set as well: it makes those calls return before building a record, which
    costs several per command otherwise."""
    logger = logging.getLogger("mail.log")
    if not any(isinstance(f, _OnlyWarnings) for f in logger.filters):
        logger.addFilter(_OnlyWarnings())
    logger.setLevel(logging.WARNING)


def tls_context_for(settings: Settings, hostname: str) -> ssl.SSLContext | None:
    if settings.tls_cert and settings.tls_key:
        return server_context(Path(settings.tls_cert), Path(settings.tls_key))
    if settings.tls_self_signed:
        cert, key = self_signed(settings.data_dir / "tls", hostname)
        return server_context(cert, key)
    return None


def relay_tls_context(settings: Settings) -> ssl.SSLContext:
    """The context for STARTTLS to next hops; ValueError naming the setting when the CA
    file cannot be used."""
    try:
        return client_context(settings.relay_tls_verify, settings.relay_tls_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"MAILMETA_RELAY_TLS_CA_FILE {settings.relay_tls_ca_file!r}: cannot load: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from None


def spool_dir(settings: Settings) -> Path:
    # Each worker process its own directory: a spool has exactly one writer. Each region its
    # own too: regions side by side on one data dir must never replay each other's events.
    spool = "spool" if settings.region == DEFAULT_REGION else f"spool.{settings.region}"
    return settings.data_dir / spool / f"w{settings.ingest_worker_index}"


def hold_elsewhere(directory: Path, region: str, records: Sequence[Record]) -> Path:
    """Append ``records`` (fsync'd) to ``held.<region>.log`` in ``directory``: the spool's own
    framing, so the file can be moved into that region's spool directory as a segment
    (``seg-<number>.log``) for its front end to replay."""
    path = directory / f"held.{region}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        data = memoryview(b"".join(encode_frame(k, v) for k, v in records))
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


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
        data_size_limit: int | None = None,
        delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT,
        max_recipients: int | None = None,
        spool_enabled: bool | None = None,
        producer_config: dict[str, Any] | None = None,
        reuse_port: bool = False,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        if customers.region != settings.region:
            # The customers as seen from the region this server serves (its raw topic's):
            # ConfigError (a ValueError) when the file does not declare that region.
            customers = customers.serving(settings.region)
        self.customers = customers
        self.host = settings.smtp_host if host is None else host
        self._port = settings.smtp_port if port is None else port
        self.reuse_port = reuse_port
        # Once, here: aiosmtpd would otherwise call socket.getfqdn() (DNS) per connection.
        self.hostname = hostname or socket.gethostname()
        self.data_size_limit = data_size_limit or settings.smtp_max_message_size
        proxy_networks = parse_networks(
            settings.smtp_proxy_networks, "MAILMETA_SMTP_PROXY_NETWORKS"
        )
        relay_tls = relay_tls_context(settings)  # before the producer: a bad setting fails first
        self.producer = EventProducer(
            kafka_producer_config(settings),
            settings.raw_topic,
            delivery_timeout=delivery_timeout,
            extra_config=producer_config,
        )
        if spool_enabled is None:
            spool_enabled = settings.ingest_spool_max_bytes > 0
        self.spool = (
            Spool(spool_dir(settings), settings.ingest_spool_max_bytes) if spool_enabled else None
        )
        self.handler = IngestHandler(
            customers,
            self.producer,
            spool=self.spool,
            max_recipients=max_recipients or settings.smtp_max_recipients,
            relay_to=settings.relay_to or None,
            access=RelayAccess(customers, settings.relay_networks),
            spool_after=settings.ingest_spool_after_s,
            relay_tls=relay_tls,
        )
        authenticator = Authenticator(customers)
        self.shared = Shared(
            handler=self.handler,
            hostname=self.hostname,
            ident="mailmeta ESMTP",  # not aiosmtpd's name and version
            data_size_limit=self.data_size_limit,
            timeout=settings.smtp_timeout,
            max_errors=settings.smtp_max_errors,
            max_per_ip=settings.smtp_max_connections_per_ip,
            tls_context=tls_context or tls_context_for(settings, self.hostname),
            authenticator=authenticator if authenticator else None,
            proxy_networks=proxy_networks,
        )
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replayer: asyncio.Task[None] | None = None
        quiet_aiosmtpd_log()

    @property
    def _connections(self) -> set[FrontEndSMTP]:
        return self.shared.connections

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> FrontEndSMTP:
        assert self._loop is not None
        return FrontEndSMTP(self.shared, self._loop)

    async def start(self) -> IngestServer:
        self._loop = asyncio.get_running_loop()
        if self.spool is not None:
            left = self.spool.open()
            if left:
                log.warning("spool %s holds %d event(s) from an earlier run: replaying",
                            self.spool.directory, left)  # fmt: skip
            spool = self.spool
            metrics.SPOOL_DEPTH.set_function(lambda: spool.pending)
            metrics.SPOOL_BYTES.set_function(lambda: spool.bytes_on_disk)
        self.producer.start()
        await self.producer.warm_up()
        try:
            self._server = await self._loop.create_server(
                self._protocol,
                host=self.host,
                port=self._port,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
                backlog=1024,
            )
        except BaseException:
            await self.producer.aclose(flush_timeout=1.0)
            if self.spool is not None:
                await self.spool.aclose()
            raise
        if self.spool is not None:
            self._replayer = self._loop.create_task(self._replay())
        log.info("SMTP listening on %s:%d", self.host, self.port)
        return self

    async def _replay(self) -> None:
        assert self.spool is not None
        await replay_forever(
            self.spool,
            self._deliver_replayed,
            ready=lambda: self.producer.queued() == 0,
            skip=self.handler.late_acked,
            on_replayed=metrics.SPOOL_REPLAYED.inc,
        )

    async def _deliver_replayed(self, records: Sequence[Record]) -> None:
        """Replay spooled records, except those of customers pinned to another region since
        they were spooled (the customers file changed): never onto this region's topic. They
        are kept on disk (:func:`hold_elsewhere`), after this region's own are acknowledged
        (a failure retries the batch, so the order keeps them from being held twice)."""
        here: list[Record] = []
        away: dict[str, list[Record]] = {}
        for record in records:
            region = self._region_of(record[1])
            if region is None:
                here.append(record)
            else:
                away.setdefault(region, []).append(record)
        if here:
            await self.producer.deliver(here)
        assert self.spool is not None
        for region, held in away.items():
            path = await asyncio.to_thread(hold_elsewhere, self.spool.directory, region, held)
            metrics.SPOOL_HELD.inc(len(held))
            log.error("spool: %d event(s) of customers now served in region %r not replayed "
                      "here; kept in %s for that region's spool", len(held), region, path)  # fmt: skip

    def _region_of(self, value: bytes) -> str | None:
        """The other region a spooled event's customer is pinned to, else None."""
        try:
            customer_id = orjson.loads(value).get("customer_id")
        except (orjson.JSONDecodeError, AttributeError):
            return None  # not ours to judge: replayed as it was spooled
        away = (
            self.customers.served_elsewhere(customer_id) if isinstance(customer_id, str) else None
        )
        return away.region if away is not None else None

    async def stop(
        self, grace: float = SHUTDOWN_GRACE, flush_timeout: float = FLUSH_TIMEOUT
    ) -> None:
        """Stop accepting, let transactions in flight finish (up to ``grace`` s), close idle
        connections with a 421, then flush the producer (up to ``flush_timeout`` s). What
        the spool still holds stays on disk for the next start."""
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
                    transport.write(_GOODBYE)
                    transport.close()
            if loop.time() >= deadline:
                busy = [p for p in self._connections if p.in_transaction]
                if busy:
                    log.warning("aborting %d transaction(s) still open at shutdown", len(busy))
                for proto in list(self._connections):
                    if proto.transport is not None:
                        proto.transport.abort()
                break
            await asyncio.sleep(0.05)
        # Let connection_lost callbacks run before the server object goes away.
        await asyncio.sleep(0)
        try:
            await asyncio.wait_for(server.wait_closed(), 1.0)
        except TimeoutError:
            pass
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
            self._replayer = None
        await self.producer.aclose(flush_timeout=flush_timeout)
        if self.spool is not None:
            await self.spool.aclose()
            if self.spool.pending:
                log.warning("%d spooled event(s) left for the next start", self.spool.pending)
        log.info("SMTP server stopped")

    async def __aenter__(self) -> IngestServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
