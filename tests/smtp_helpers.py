"""Helpers for the ingest tests: the server in a thread, a raw SMTP wire client, reading the
raw topic. Every wait is bounded; everything started here is stopped here."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition

from mailmeta.config import Customers, Settings
from mailmeta.ingest import IngestServer

REPO = Path(__file__).resolve().parent.parent
SWAKS = REPO / ".tools" / "usr" / "bin" / "swaks"
SMTP_SOURCE = REPO / ".tools" / "usr" / "sbin" / "smtp-source"


class ServerThread:
    """An :class:`IngestServer` on its own event loop in a thread, so tests stay synchronous."""

    def __init__(self, settings: Settings, customers: Customers, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="ingest-test-loop", daemon=True)
        self.server = IngestServer(settings, customers, **kwargs)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Loop stopped: settle leftover tasks and join the default executor's threads.
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> IngestServer:
        self.thread.start()
        try:
            self.call(self.server.start(), 15)
        except BaseException:
            self.close()
            raise
        return self.server

    def stop_async(self, grace: float = 3.0) -> Any:
        """Begin a graceful stop; returns a concurrent future."""
        return asyncio.run_coroutine_threadsafe(
            self.server.stop(grace=grace, flush_timeout=3.0), self.loop
        )

    def close(self) -> None:
        try:
            if self.thread.is_alive():
                self.call(self.server.stop(grace=3.0, flush_timeout=3.0), 20)
        finally:
            if self.thread.is_alive():
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(15)
            assert not self.thread.is_alive(), "server thread did not stop"


@contextlib.contextmanager
def running_server(
    settings: Settings, customers: Customers, **kwargs: Any
) -> Iterator[IngestServer]:
    st = ServerThread(settings, customers, **kwargs)
    srv = st.start()
    try:
        yield srv
    finally:
        st.close()


class Wire:
    """A byte-exact SMTP client: smtplib rewrites line endings, this one does not."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 15.0,
        *,
        source: str | None = None,
        preamble: bytes = b"",
    ) -> None:
        # source: another loopback address (127.0.0.2 …) to tell the client from the server;
        # preamble: bytes sent before the greeting is read (a PROXY protocol header).
        src = (source, 0) if source else None
        self.sock = socket.create_connection((host, port), timeout=timeout, source_address=src)
        if preamble:
            self.sock.sendall(preamble)
        self.buf = b""
        self.greeting = self.reply()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self._line()
            lines.append(line[4:].decode())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def send(self, raw: bytes) -> tuple[int, str]:
        self.sock.sendall(raw)
        return self.reply()

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def message(
    subject: str = "hello",
    *,
    body: str = "body line\r\n",
    extra: str = "",
    message_id: str | None = None,
) -> bytes:
    mid = message_id or f"<{uuid.uuid4().hex}@test.example>"
    head = (
        f"From: Sender <sender@example.org>\r\n"
        f"To: someone@demo.example\r\n"
        f"Subject: {subject}\r\n"
        f"Message-ID: {mid}\r\n"
        f"Date: Tue, 01 Jul 2025 10:00:00 +0200\r\n"
        f"{extra}"
    )
    return (head + "\r\n" + body).encode()


def read_raw(settings: Settings, *, min_count: int = 0, timeout: float = 10.0) -> list[bytes]:
    """Every record on the raw topic: read each partition from offset 0 to its end.

    ``assign`` instead of ``subscribe`` skips the consumer-group join (~3 s on Tansu); a
    reply of 250 means the broker acknowledged, so reading to the end sees every event.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    values: list[bytes] = []
    try:
        md = consumer.list_topics(settings.raw_topic, timeout=5)
        parts = sorted(md.topics[settings.raw_topic].partitions)
        consumer.assign([TopicPartition(settings.raw_topic, p, 0) for p in parts])
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"consume failed: {err}")
                at_end.add(msg.partition())
            else:
                values.append(msg.value())
                at_end.discard(msg.partition())
            if len(at_end) == len(parts) and len(values) >= min_count:
                break
    finally:
        consumer.close()
    return values


def read_events(settings: Settings, **kwargs: Any) -> list[dict[str, Any]]:
    return [orjson.loads(v) for v in read_raw(settings, **kwargs)]


def write_customers(path: Path, customers: list[dict[str, Any]]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"customers": customers}), encoding="utf-8")
    return path


class NextHop:
    """A real SMTP next hop (aiosmtpd on its own loop in a thread) that keeps what it
    received and answers DATA with ``reply``; ``rcpt_reply`` refuses recipients."""

    def __init__(self, reply: str = "250 2.0.0 Ok: queued as NEXTHOP1") -> None:
        from aiosmtpd.smtp import SMTP

        self.reply = reply
        self.rcpt_reply: str | None = None
        # Per recipient: a reply that refuses it (e.g. "450 …" or "550 …"); changed at will.
        self.rcpt_replies: dict[str, str] = {}
        self.received: list[tuple[str, list[str], bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        hop = self

        class Handler:
            async def handle_RCPT(self, server, session, envelope, address, options):  # type: ignore[no-untyped-def]
                refusal = hop.rcpt_replies.get(address) or hop.rcpt_reply
                if refusal:
                    return refusal
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
                if hop.reply.startswith("2"):
                    hop.received.append(
                        (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
                    )
                return hop.reply

        self._factory = lambda: SMTP(Handler(), hostname="nexthop.test", loop=self.loop)

    def __enter__(self) -> NextHop:
        self.thread.start()

        async def start() -> asyncio.AbstractServer:
            return await self.loop.create_server(self._factory, "127.0.0.1", 0)

        self._server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            # Sessions end once their clients have gone: let their tasks finish (bounded), so
            # none is destroyed pending when the loop stops.
            sessions = asyncio.all_tasks() - {asyncio.current_task()}
            if sessions:
                _, stuck = await asyncio.wait(sessions, timeout=5)
                for task in stuck:
                    task.cancel()
                await asyncio.gather(*stuck, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.loop.close()


def listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (Linux's /proc/net tables), seen without
    connecting: a probe that the server accepts as it closes its listener would leave an
    unclosed transport behind (Python 3.11's asyncio), so stop tests poll this instead."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                return True
    return False


class TlsNextHop(NextHop):
    """A :class:`NextHop` that offers STARTTLS with ``tls_context`` (None: offers none) and
    notes the TLS version each received message came over (None: plaintext)."""

    def __init__(
        self, tls_context: ssl.SSLContext | None, reply: str = "250 2.0.0 Ok: queued as NEXTHOP1"
    ) -> None:
        from aiosmtpd.smtp import SMTP

        super().__init__(reply)
        self.tls_versions: list[str | None] = []
        hop = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
                hop.received.append(
                    (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
                )
                obj = session.ssl.get("ssl_object") if isinstance(session.ssl, dict) else None
                hop.tls_versions.append(obj.version() if obj is not None else None)
                return hop.reply

        self._factory = lambda: SMTP(
            Handler(),
            hostname="nexthop.test",
            loop=self.loop,
            tls_context=tls_context,
            require_starttls=False,
        )
