"""A read-only milter for Postfix (``smtpd_milters``): the events of every message Postfix
receives, through the same raw topic and redaction path as the SMTP front end.

It never modifies, rejects or holds a message: it negotiates no action, skips the body and
every step it does not need, and answers end-of-message at once, or (``answer_within`` > 0)
once the event is recorded but within that many seconds whatever the broker does; the event
goes on to the broker or the spool in the background. Of each header only Message-ID, Subject and Date are kept; every other header
is dropped as it arrives, never copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import cast

from mailmeta import schema
from mailmeta.config import Customers, Settings
from mailmeta.ingest._extract import (
    HeaderFields,
    build_event,
    clean_helo,
    envelope_sender,
    extract_headers,
)
from mailmeta.ingest.postfix import _codec as mc
from mailmeta.ingest.postfix._recorder import Recorder

log = logging.getLogger("mailmeta.ingest.milter")

# Postfix is answered at once by default: waiting for the broker's acknowledgement (~5-10 ms
# with linger and acks=all) costs Postfix throughput and buys nothing — a milter that dies
# before recording loses the event either way, since Postfix goes on without it.
ANSWER_WITHIN = 0.0
# A connection the MTA leaves silent this long is dropped (Postfix's own milter timeouts are
# shorter; this only keeps a dead peer from holding a task forever).
IDLE_TIMEOUT = 900.0
BATCH_WINDOW = 0.005  # the producer's own linger.ms
_WANTED_HEADERS = frozenset({b"message-id", b"subject", b"date"})
_MAX_HEADER = 4096  # of a wanted header's value; extract_headers bounds it further


@dataclass
class _Message:
    queue_id: str | None = None
    mail_from: str = ""
    size: int | None = None
    rcpts: list[str] = field(default_factory=list)
    header_block: bytearray = field(default_factory=bytearray)
    seen: set[bytes] = field(default_factory=set)


@dataclass
class _Connection:
    client_addr: str | None = None
    helo: str | None = None
    tls_version: str | None = None
    message: _Message = field(default_factory=_Message)


def _address(arg: bytes) -> str:
    text = arg.decode("utf-8", "replace").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text


def _declared_size(args: list[bytes]) -> int | None:
    for arg in args:
        key, _, value = arg.partition(b"=")
        if key.upper() == b"SIZE" and value.isdigit() and len(value) < 16:
            return int(value)
    return None


def _quick_ack(sock: socket.socket | None) -> None:
    """ACK at once (Linux resets this after a while, so it is set after every read).

    Postfix sends the commands it wants no reply to (headers, connect …) as separate small
    writes; with Nagle's algorithm on its side, each waits for the ACK of the one before,
    and a delayed ACK here (nothing to send back) costs ~40 ms per message."""
    if sock is not None and _QUICKACK is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class MilterServer:
    """``async with MilterServer(settings, customers, port=...) as m: ...``"""

    def __init__(
        self,
        settings: Settings,
        customers: Customers,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        answer_within: float = ANSWER_WITHIN,
    ) -> None:
        if customers.region != settings.region:
            customers = customers.serving(settings.region)
        self.customers = customers
        self.host = host
        self._port = port
        self.answer_within = answer_within
        self.recorder = Recorder(settings, customers, "milter")
        self._server: asyncio.Server | None = None
        self._background: set[asyncio.Task[str | None]] = set()
        self._connections: set[_MilterProtocol] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._waiters: set[asyncio.Task[None]] = set()
        self._pending: list[schema.Event] = []
        self._flush_timer: asyncio.TimerHandle | None = None

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> MilterServer:
        await self.recorder.start()
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _MilterProtocol(self), self.host, self._port, reuse_address=True
            )
        except BaseException:
            await self.recorder.aclose(1.0)
            raise
        self._sweeper = loop.create_task(self._sweep())
        log.info("milter listening on %s:%d", self.host, self.port)
        return self

    async def stop(self, grace: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for proto in list(self._connections):
            proto.close()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self._flush_pending()
        if self._background:
            await asyncio.wait(self._background, timeout=grace)
        await self.recorder.aclose()

    async def __aenter__(self) -> MilterServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _sweep(self) -> None:
        """Drop connections the MTA left silent for IDLE_TIMEOUT (one timer for all)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(IDLE_TIMEOUT / 10)
            now = loop.time()
            for proto in list(self._connections):
                if now - proto.last_seen > IDLE_TIMEOUT:
                    proto.close()

    def _step(self, conn: _Connection, command: bytes, data: bytes) -> None:
        msg = conn.message
        if command == mc.MACRO:
            values = mc.macros(data)
            if "client_addr" in values:
                conn.client_addr = values["client_addr"] or None
            if "tls_version" in values:
                conn.tls_version = values["tls_version"] or None
            if values.get("i"):
                msg.queue_id = values["i"][:32]
        elif command == mc.CONNECT:
            c = mc.connect(data)
            conn.client_addr = conn.client_addr or c.address
        elif command == mc.HELO:
            parts = mc.strings(data)
            conn.helo = clean_helo(parts[0].decode("utf-8", "replace")) if parts else None
        elif command == mc.MAIL:
            parts = mc.strings(data)
            conn.message = msg = _Message(queue_id=msg.queue_id)
            msg.mail_from = envelope_sender(_address(parts[0])) if parts else ""
            msg.size = _declared_size(parts[1:])
        elif command == mc.RCPT:
            parts = mc.strings(data)
            if parts:
                rcpt = _address(parts[0])
                if rcpt and rcpt not in msg.rcpts:
                    msg.rcpts.append(rcpt)
        elif command == mc.HEADER:
            name, value = mc.header(data)
            key = name.strip().lower()
            # Every other header is dropped here, unread; a wanted one only the first time.
            if key in _WANTED_HEADERS and key not in msg.seen:
                msg.seen.add(key)
                value = value[:_MAX_HEADER].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
                msg.header_block += key + b": " + value + b"\r\n"
        elif command == mc.ABORT:
            conn.message = _Message()

    def events(self, conn: _Connection) -> list[schema.Event]:
        """One event per customer among the recipients; none for mail to no customer."""
        msg = conn.message
        started = time.perf_counter()
        by_customer: dict[str, list[str]] = {}
        for rcpt in msg.rcpts:
            customer = self.customers.for_address(rcpt)
            if customer is None or self.customers.served_elsewhere(customer.id) is not None:
                continue  # another region's customer: never on this region's topic
            by_customer.setdefault(customer.id, []).append(rcpt)
        if not by_customer:
            return []
        headers = (
            extract_headers(bytes(msg.header_block) + b"\r\n")
            if msg.header_block
            else HeaderFields(None, None, None)
        )
        out = []
        for customer_id, rcpts in by_customer.items():
            ev = build_event(
                event_id=schema.new_event_id(),
                customer_id=customer_id,
                headers=headers,
                rcpt_to=rcpts,
                mail_from=msg.mail_from,
                sender_ip=conn.client_addr,
                helo=conn.helo,
                size_bytes=0,
                processing_ms=round((time.perf_counter() - started) * 1000, 3),
                tls_version=conn.tls_version,
            )
            ev.size_bytes = msg.size  # only what the client declared (SIZE=); the body is skipped
            # Postfix's queue id: what its log (the follower's events) names the message by.
            ev.smtp_reply = f"250 2.0.0 Ok: queued as {msg.queue_id}" if msg.queue_id else None
            out.append(ev)
        return out

    def end_of_message(self, conn: _Connection) -> asyncio.Task[str | None] | None:
        """Start recording the message's events; the task, or None when there are none."""
        try:
            events = self.events(conn)
        except Exception as exc:  # a hostile message must cost its event, never the mail
            log.warning("milter: message not recorded: %s", type(exc).__name__)
            return None
        if not events:
            return None
        if self.answer_within > 0:
            return self._record(events)
        # Answered at once: the events of the next few milliseconds go to the broker
        # together (one produce-and-wait for many messages instead of one each).
        self._pending += events
        if self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(BATCH_WINDOW, self._flush_pending)
        return None

    def _flush_pending(self) -> None:
        self._flush_timer = None
        events, self._pending = self._pending, []
        if events:
            self._record(events)

    def _record(self, events: list[schema.Event]) -> asyncio.Task[str | None]:
        task = asyncio.get_running_loop().create_task(self.recorder.record(events))
        self._background.add(task)
        task.add_done_callback(self._recorded)
        return task

    def _recorded(self, task: asyncio.Task[str | None]) -> None:
        self._background.discard(task)
        if task.cancelled():
            return
        failure = task.exception() or task.result()
        if failure:
            log.error("milter: event(s) not recorded: %s", failure)


class _MilterProtocol(asyncio.Protocol):
    """One MTA connection: packets decoded as they arrive, every answer written at once (a
    Protocol, not streams and a task: a message is a dozen round trips)."""

    def __init__(self, server: MilterServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self.buffer = bytearray()
        self.agreed = mc.Negotiated(mc.VERSION, 0)
        self.conn = _Connection()
        self.waiting = False  # end of message waits for its event (answer_within > 0)
        self.last_seen = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are no subclasses of asyncio's: a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)
        self.sock = transport.get_extra_info("socket")
        self.last_seen = asyncio.get_running_loop().time()
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        _quick_ack(self.sock)
        self.last_seen = asyncio.get_running_loop().time()
        self.buffer += data
        if not self.waiting:
            self._process()

    def _process(self) -> None:
        out: list[bytes] = []
        try:
            for command, data in mc.split_packets(self.buffer):
                if command == mc.OPTNEG:
                    self.agreed, reply = mc.negotiate(data)
                    out.append(reply)
                    continue
                if command == mc.QUIT:
                    self._flush(out)
                    self.close()
                    return
                if command == mc.QUIT_NC:  # the next connection on this socket
                    self.conn = _Connection()
                    continue
                if command == mc.BODYEOB:
                    task = self.server.end_of_message(self.conn)
                    self.conn.message = _Message()
                    if task is not None and self.server.answer_within > 0:
                        self._flush(out)
                        self._wait_then_answer(task)
                        return
                else:
                    self.server._step(self.conn, command, data)
                if mc.needs_reply(command, self.agreed):
                    out.append(_CONTINUE)
        except mc.ProtocolError as exc:
            # The reason only: never the bytes.
            log.info("milter connection closed: %s", exc)
            self._flush(out)
            self.close()
            return
        self._flush(out)

    def _flush(self, out: list[bytes]) -> None:
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        out.clear()

    def _wait_then_answer(self, task: asyncio.Task[str | None]) -> None:
        self.waiting = True
        if self.transport is not None:
            self.transport.pause_reading()

        async def answer() -> None:
            await asyncio.wait([task], timeout=self.server.answer_within)
            self.waiting = False
            if self.transport is None:
                return
            self.transport.write(_CONTINUE)
            self.transport.resume_reading()
            self._process()  # what arrived meanwhile

        waiter = asyncio.get_running_loop().create_task(answer())
        self.server._waiters.add(waiter)
        waiter.add_done_callback(self.server._waiters.discard)


_CONTINUE = mc.packet(mc.CONTINUE)
