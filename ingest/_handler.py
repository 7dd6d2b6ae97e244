"""The aiosmtpd handler: recipients resolved to customers, one event per customer, 250 only
once the broker has acknowledged every event of the message."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailmeta import schema
from mailmeta.config import Customers
from mailmeta.ingest import _metrics as metrics
from mailmeta.ingest._extract import (
    accepted_reply,
    build_event,
    clean_helo,
    envelope_sender,
    extract_headers,
    has_bare_newline,
    peer_ip,
)
from mailmeta.ingest._producer import DeliveryError, EventProducer

log = logging.getLogger("mailmeta.ingest")

# RFC 5321 4.5.3.1: a server must accept at least 100 recipients per message.
DEFAULT_MAX_RECIPIENTS = 1000
_LOCAL_PART_MAX = 64
_DOMAIN_MAX = 255
_PATH_MAX = 254  # 256 octets of path minus the angle brackets

REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_BARE_NEWLINE = "550 5.5.2 Error: bare <CR> or <LF> received in message data"


class Spool(Protocol):
    """Where records go when the broker cannot take them (the durable spool, a later issue).

    ``store`` returns once the records are durable; raising means they are not, and the
    client gets a 451 so that it keeps the message and retries.
    """

    async def store(self, records: Sequence[tuple[bytes, bytes]]) -> None: ...


class IngestHandler:
    def __init__(
        self,
        customers: Customers,
        producer: EventProducer,
        *,
        spool: Spool | None = None,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    ) -> None:
        self.customers = customers
        self.producer = producer
        self.spool = spool
        self.max_recipients = max_recipients
        self.shutting_down = False
        # DATA handlers running now; graceful shutdown waits for them.
        self.in_flight = 0

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.shutting_down:
            _close_after_reply(server)
            return REPLY_SHUTTING_DOWN
        if len(address) > _PATH_MAX:
            return "553 5.1.7 Sender address too long"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        local, at, domain = address.rpartition("@")
        if (
            not at
            or not local
            or not domain
            or len(local) > _LOCAL_PART_MAX
            or len(domain) > _DOMAIN_MAX
            or len(address) > _PATH_MAX
        ):
            metrics.RECIPIENTS_REJECTED.labels("malformed").inc()
            return f"553 5.1.3 <{address}>: malformed recipient address"
        if self.customers.for_address(address) is None:
            metrics.RECIPIENTS_REJECTED.labels("unknown_domain").inc()
            return f"550 5.1.1 <{address}>: recipient domain not served here"
        if len(envelope.rcpt_tos) >= self.max_recipients:
            metrics.RECIPIENTS_REJECTED.labels("too_many").inc()
            return "452 4.5.3 Error: too many recipients"
        if address not in envelope.rcpt_tos:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_flight += 1
        try:
            return await self._data(session, envelope)
        finally:
            self.in_flight -= 1

    async def _data(self, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        content = envelope.original_content or b""
        if not isinstance(content, bytes):  # decode_data=False keeps bytes; be certain
            content = str(content).encode("utf-8", "surrogateescape")
        if has_bare_newline(content):
            metrics.MESSAGES.labels("rejected_bare_newline").inc()
            log.info("rejected message from %s: bare CR/LF in DATA", peer_ip(session.peer))
            return REPLY_BARE_NEWLINE

        headers = extract_headers(content)
        by_customer: dict[str, list[str]] = {}
        for rcpt in envelope.rcpt_tos:
            customer = self.customers.for_address(rcpt)
            if customer is not None:  # RCPT already refused the others
                by_customer.setdefault(customer.id, []).append(rcpt)

        sender_ip = peer_ip(session.peer)
        common: dict[str, Any] = {
            "headers": headers,
            "mail_from": envelope_sender(envelope.mail_from),
            "sender_ip": sender_ip,
            "helo": clean_helo(session.host_name),
            "size_bytes": len(content),
            "tls_version": _tls_version(session),
        }
        processing_ms = round((time.perf_counter() - started) * 1000, 3)
        events = [
            build_event(
                event_id=schema.new_event_id(),
                customer_id=customer_id,
                rcpt_to=rcpts,
                processing_ms=processing_ms,
                **common,
            )
            for customer_id, rcpts in by_customer.items()
        ]
        records = [(ev.event_id.encode(), schema.encode_event(ev)) for ev in events]
        ids = [ev.event_id for ev in events]

        t_produce = time.perf_counter()
        try:
            await self.producer.deliver(records)
        except DeliveryError as exc:
            return await self._undelivered(records, ids, sender_ip, str(exc))
        metrics.PRODUCE_LATENCY.observe(time.perf_counter() - t_produce)
        metrics.EVENTS_PRODUCED.inc(len(records))
        metrics.MESSAGES.labels("accepted").inc()
        log.info(
            "accepted message from %s as %s (%d bytes, %.1f ms)",
            sender_ip,
            " ".join(ids),
            len(content),
            (time.perf_counter() - started) * 1000,
        )
        return accepted_reply(ids)

    async def _undelivered(
        self,
        records: list[tuple[bytes, bytes]],
        ids: list[str],
        sender_ip: str | None,
        reason: str,
    ) -> str:
        # Seam for the durable spool: once it holds the records, the message is ours.
        if self.spool is not None:
            try:
                await self.spool.store(records)
            except Exception as exc:
                log.error("spool failed: %s", type(exc).__name__)
            else:
                metrics.MESSAGES.labels("spooled").inc()
                log.warning("broker unavailable (%s); spooled %s", reason, " ".join(ids))
                return accepted_reply(ids)
        metrics.MESSAGES.labels("deferred_produce_failed").inc()
        log.warning("deferred message from %s: broker did not acknowledge: %s", sender_ip, reason)
        return f"451 4.3.0 Temporary failure, try again later: {reason}"

    async def handle_exception(self, error: Exception) -> str:
        # The type only: an exception's text could quote message data.
        log.error("SMTP session error: %s", type(error).__name__)
        return "451 4.3.0 Internal error, try again later"


def _tls_version(session: Session) -> str | None:
    info = session.ssl
    if not info:
        return None
    ssl_object = info.get("ssl_object") if isinstance(info, dict) else None
    version = ssl_object.version() if ssl_object is not None else None
    return str(version) if version else None


def _close_after_reply(server: SMTP) -> None:
    # aiosmtpd writes our reply right after the hook returns, before yielding to the loop,
    # so a callback scheduled now closes the connection after the 421 is on its way.
    transport = server.transport
    if transport is not None:
        asyncio.get_running_loop().call_soon(transport.close)
