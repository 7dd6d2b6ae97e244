"""The aiosmtpd handler: recipients resolved to customers (and who may relay), the message
relayed to the next hop when there is one, one event per customer, and a 250 only once every
event is acknowledged by the broker or fsync'd in the durable spool."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
import time
from collections.abc import Sequence
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailmeta import schema
from mailmeta.config import Customer, Customers, Elsewhere
from mailmeta.ingest import _metrics as metrics
from mailmeta.ingest._auth import AuthUser, RelayAccess
from mailmeta.ingest._dsn import (
    BounceRoutes,
    DsnError,
    looks_like_report,
    parse_dsn_bounded,
    status_events,
)
from mailmeta.ingest._dsn_params import DsnParamError, MailDsn, RcptDsn
from mailmeta.ingest._extract import (
    accepted_reply,
    build_event,
    clean_helo,
    envelope_sender,
    extract_headers,
    has_bare_newline,
    peer_ip,
    scrub_text,
)
from mailmeta.ingest._producer import DeliveryError, EventProducer
from mailmeta.ingest._protocol import FrontEndSMTP, MailEnvelope
from mailmeta.ingest._relay import RelayReply, relay
from mailmeta.ingest._spool import Spool, SpoolFull
from mailmeta.ingest._tls import client_context, tls_info
from mailmeta.kafka import discard_futures

log = logging.getLogger("mailmeta.ingest")

# RFC 5321 4.5.3.1: a server must accept at least 100 recipients per message.
DEFAULT_MAX_RECIPIENTS = 1000
_LOCAL_PART_MAX = 64
_DOMAIN_MAX = 255
_PATH_MAX = 254  # 256 octets of path minus the angle brackets

REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_BARE_NEWLINE = "550 5.5.2 Error: bare <CR> or <LF> received in message data"
REPLY_DEFERRED = "451 4.3.0 Temporary failure, try again later"
REPLY_TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"


def other_region_reply(away: Elsewhere) -> str:
    """The refusal of a recipient whose customer is served elsewhere: a 4xx, since mail
    still arriving here after a customer moved (MX records have TTLs) must be retried, not
    bounced. Names the region and its SMTP host only: no address, nothing internal."""
    host = f" ({away.smtp_host})" if away.smtp_host else ""
    return f"450 4.7.1 Recipient is served in region {away.region!r}{host}; not accepted here"


# Precomputed children: ``labels()`` takes a lock and a dict lookup on every call.
_ACCEPTED = metrics.MESSAGES.labels("accepted")
_SPOOLED = metrics.MESSAGES.labels("spooled")


class IngestHandler:
    def __init__(
        self,
        customers: Customers,
        producer: EventProducer,
        *,
        spool: Spool | None = None,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        relay_to: str | None = None,
        access: RelayAccess | None = None,
        spool_after: float = 2.0,
        relay_timeout: float = 60.0,
        relay_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.customers = customers
        self.producer = producer
        self.spool = spool
        self.max_recipients = max_recipients
        self.relay_to = relay_to or None
        self.access = access or RelayAccess(customers, "")
        self.bounces = BounceRoutes(customers)
        self.spool_after = spool_after
        self.relay_timeout = relay_timeout
        # STARTTLS to next hops that offer it (the server passes the configured context).
        self.relay_tls = relay_tls or client_context(verify=False)
        # DSN (RFC 3461) is advertised only where mail may be relayed: its parameters go on
        # to a next hop that offers DSN. A terminal sink would owe "delivered" notices for
        # NOTIFY=SUCCESS, which it does not send.
        self.offers_dsn = bool(self.relay_to) or any(c.relay_to for c in customers)
        self.shutting_down = False
        # DATA handlers running now; graceful shutdown waits for them.
        self.in_flight = 0
        # Ids of spooled events whose direct produce was acknowledged late: replay skips them.
        self.late_acked: set[bytes] = set()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # aiosmtpd advertises "AUTH" with an empty list after STARTTLS when no mechanism is
        # configured: not a valid EHLO line.
        lines = [r for r in responses if r.rstrip() != "250-AUTH"]
        if self.offers_dsn and isinstance(server, FrontEndSMTP):
            server.offer_dsn()  # only our protocol takes the parameters out of the commands
            lines.insert(len(lines) - 1, "250-DSN")
        return lines

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
        dsn = _dsn_params(server)
        if isinstance(dsn, DsnParamError):
            return dsn.reply
        assert isinstance(envelope, MailEnvelope)
        envelope.dsn = dsn if isinstance(dsn, MailDsn) else None
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    def next_hop(self, customer: Customer) -> str | None:
        return customer.relay_to or self.relay_to

    def _relay_customer(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> Customer | bool | None:
        """Who a foreign recipient is relayed for: the AUTH user's customer, else the owner of
        the client's network, else (client in the relay networks) the sender domain's owner.
        False: the client may not relay at all."""
        user = session.auth_data
        if isinstance(user, AuthUser):
            return self.customers.by_id.get(user.customer_id)
        ip = server.client_ip if isinstance(server, FrontEndSMTP) else peer_ip(session.peer)
        owner = self.access.network_customer(ip)
        if owner is not None:
            return owner
        if self.access.in_relay_networks(ip):
            return self.customers.for_address(envelope_sender(envelope.mail_from))
        return False

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
        dsn = _dsn_params(server)
        if isinstance(dsn, DsnParamError):
            metrics.RECIPIENTS_REJECTED.labels("malformed").inc()
            return dsn.reply
        # Inbound: mail to a customer's own domain (or bounce address) is accepted from anyone.
        customer = self.customers.for_domain(domain)
        if customer is None and self.bounces:
            owner = self.bounces.customer_for(address)
            customer = self.customers.by_id.get(owner) if owner else None
        if customer is None:
            relay_for = self._relay_customer(server, session, envelope)
            if not isinstance(relay_for, Customer):
                # Never an open relay; one reply whether or not the client may relay at all
                # (the README documents it).
                reason = "relay_denied" if relay_for is False else "unknown_domain"
                metrics.RECIPIENTS_REJECTED.labels(reason).inc()
                return f"550 5.1.1 <{address}>: recipient domain not served here"
            customer = relay_for
        away = self.customers.served_elsewhere(customer.id)
        if away is not None:
            # Pinned to another region: refused before DATA, so not one byte of its mail and
            # no event of it exists in this region (spool and DSN events included).
            metrics.RECIPIENTS_REJECTED.labels("other_region").inc()
            log.info("refused a recipient of customer %r on %r: served in region %r",
                     customer.id, session.peer, away.region)  # fmt: skip
            return other_region_reply(away)
        if customer.require_tls and not session.ssl:
            metrics.RECIPIENTS_REJECTED.labels("tls_required").inc()
            return REPLY_TLS_REQUIRED
        if len(envelope.rcpt_tos) >= self.max_recipients:
            metrics.RECIPIENTS_REJECTED.labels("too_many").inc()
            return "452 4.5.3 Error: too many recipients"
        hop = self.next_hop(customer)
        assert isinstance(envelope, MailEnvelope)
        if envelope.rcpt_tos and hop != envelope.next_hop:
            # One transaction, one next hop: the client sends this one separately
            # (452 makes it retry the recipient, RFC 5321 4.5.3.1.10).
            metrics.RECIPIENTS_REJECTED.labels("next_hop").inc()
            return f"452 4.5.3 <{address}>: different next hop, send it in a new transaction"
        envelope.next_hop = hop
        if address not in envelope.rcpt_tos:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            envelope.customer_of[address] = customer.id
            if isinstance(dsn, RcptDsn):
                envelope.rcpt_dsn[address] = dsn
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_flight += 1
        try:
            return await self._data(server, session, envelope)
        finally:
            self.in_flight -= 1

    async def _data(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        content = envelope.original_content or b""
        if not isinstance(content, bytes):  # decode_data=False keeps bytes; be certain
            content = str(content).encode("utf-8", "surrogateescape")
        if has_bare_newline(content):
            metrics.MESSAGES.labels("rejected_bare_newline").inc()
            log.info("rejected message on %r: bare CR/LF in DATA", session.peer)
            return REPLY_BARE_NEWLINE
        assert isinstance(envelope, MailEnvelope)

        headers = extract_headers(content)
        by_customer: dict[str, list[str]] = {}
        for rcpt in envelope.rcpt_tos:
            by_customer.setdefault(envelope.customer_of[rcpt], []).append(rcpt)
        sender_ip = server.client_ip if isinstance(server, FrontEndSMTP) else peer_ip(session.peer)
        mail_from = envelope_sender(envelope.mail_from)
        helo = clean_helo(session.host_name)
        common: dict[str, Any] = {
            "headers": headers,
            "mail_from": mail_from,
            "sender_ip": sender_ip,
            "helo": helo,
            "size_bytes": len(content),
            "tls_version": tls_info(session.ssl)[0],
        }

        verdict: RelayReply | None = None
        if envelope.next_hop is not None:
            t_relay = time.perf_counter()
            verdict = await relay(
                envelope.next_hop,
                helo=server.hostname,
                mail_from=mail_from,
                rcpt_to=list(envelope.rcpt_tos),
                content=content,
                time_limit=self.relay_timeout,
                tls=self.relay_tls,
                require_tls=any(self.customers.by_id[c].require_tls for c in by_customer),
                dsn=envelope.dsn,
                rcpt_dsn=envelope.rcpt_dsn,
            )
            metrics.RELAY_LATENCY.observe(time.perf_counter() - t_relay)

        if verdict is None:
            # Nothing was delivered yet: a failure here is a 4xx, and the client retries.
            return await self._record_message(content, envelope, session, by_customer, common,
                                              started, verdict)  # fmt: skip
        # The next hop has decided; its verdict is the client's whatever becomes of our
        # event: anything else would make the client send the message again (a second copy
        # at the hop). A failure to build or record the event is logged and counted.
        metrics.MESSAGES.labels(f"relayed_{verdict.status}").inc()
        try:
            await self._record_message(
                content, envelope, session, by_customer, common, started, verdict
            )
        except Exception as exc:
            metrics.METADATA_LOST.inc()
            # The type only: an exception's text could quote message data.
            log.error("event of a relayed message on %r not recorded: %s",
                      session.peer, type(exc).__name__)  # fmt: skip
        return verdict.line

    async def _record_message(
        self,
        content: bytes,
        envelope: MailEnvelope,
        session: Session,
        by_customer: dict[str, list[str]],
        common: dict[str, Any],
        started: float,
        verdict: RelayReply | None,
    ) -> str:
        """Build, encode and record the message's events (and a DSN's status events); the
        reply a terminal sink gives (relay mode replies with the hop's verdict instead)."""
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
        if verdict is not None:
            for ev in events:
                ev.status = verdict.status
                ev.smtp_reply = verdict.event_line
        ids = [ev.event_id for ev in events]  # the message's own: what the reply names
        if self.bounces and (verdict is None or verdict.status == "delivered"):
            # Only once the DSN is ours to keep: a deferred one comes again. Recorded with
            # the DSN's own event, durable before the 250 like it.
            events += await self._dsn_events(content, envelope, session)
        records = [(ev.event_id.encode(), encode_event(ev)) for ev in events]
        failure = await self.record(records)
        if verdict is not None:
            if failure is not None:
                metrics.METADATA_LOST.inc()
                log.error("event(s) %s not recorded: %s", " ".join(ids), failure)
            return verdict.line
        if failure is not None:
            log.warning("deferred message on %r: %s", session.peer, failure)
            return REPLY_DEFERRED  # the reason is ours: nothing internal to the client
        _ACCEPTED.inc()
        return accepted_reply(ids)

    async def _dsn_events(
        self, content: bytes, envelope: MailEnvelope, session: Session
    ) -> list[schema.Event]:
        """Status events for the original message when this is a DSN to a bounce address."""
        bounce_rcpts: dict[str, list[str]] = {}
        for rcpt in envelope.rcpt_tos:
            owner = self.bounces.customer_for(rcpt)
            if owner is not None and owner == envelope.customer_of[rcpt]:
                bounce_rcpts.setdefault(owner, []).append(rcpt)
        if not bounce_rcpts or not looks_like_report(content):
            return []
        try:
            dsn = await parse_dsn_bounded(content)
            out: list[schema.Event] = []
            for customer_id, rcpts in bounce_rcpts.items():
                out += status_events(dsn, customer_id, rcpts)
        except DsnError as exc:
            metrics.DSN.labels("unusable").inc()
            log.info("delivery status notification on %r not used: %s", session.peer, exc)
            return []
        except Exception as exc:  # a hostile report must cost its status, never the mail
            metrics.DSN.labels("unusable").inc()
            # The type only: an exception's text could quote message data.
            log.warning("delivery status notification on %r not parsed: %s",
                        session.peer, type(exc).__name__)  # fmt: skip
            return []
        metrics.DSN.labels("status_recorded").inc()
        return out

    async def record(self, records: list[tuple[bytes, bytes]]) -> str | None:
        """Make the records durable: acknowledged by the broker, or else fsync'd in the spool.
        None on success, else a short reason (for a 451)."""
        spool = self.spool
        if spool is not None and spool.active:
            # Something is spooled already: queue behind it, so replay keeps the order.
            return await self._spool(spool, records, "spool in use")
        t_produce = time.perf_counter()
        try:
            futures = self.producer.send(records)
        except DeliveryError as exc:
            if spool is None:
                metrics.MESSAGES.labels("deferred_produce_failed").inc()
                return str(exc)
            return await self._spool(spool, records, str(exc))
        timeout = self.spool_after if spool is not None else self.producer.delivery_timeout + 5.0
        done, pending = await asyncio.wait(futures, timeout=timeout)
        errors = [e for e in (f.exception() for f in done) if e is not None]
        failed = errors[0] if errors else None
        if not pending and failed is None:
            metrics.PRODUCE_LATENCY.observe(time.perf_counter() - t_produce)
            metrics.EVENTS_PRODUCED.inc(len(records))
            return None
        reason = str(failed) if failed is not None else "timed out waiting for the event store"
        if spool is None:
            discard_futures(futures)
            metrics.MESSAGES.labels("deferred_produce_failed").inc()
            return reason
        # The producer may still deliver these; if it does, replay must not send them again.
        for fut, (key, _) in zip(futures, records, strict=True):
            if not fut.done():
                fut.add_done_callback(lambda f, k=key: self._late(f, k))
        return await self._spool(spool, records, reason)

    def _late(self, fut: asyncio.Future[None], key: bytes) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.late_acked.add(key)

    async def _spool(
        self, spool: Spool, records: Sequence[tuple[bytes, bytes]], why: str
    ) -> str | None:
        try:
            await spool.store(records)
        except SpoolFull as exc:
            metrics.MESSAGES.labels("deferred_spool_full").inc()
            log.error("%s; broker: %s", exc, why)
            return "local spool is full"
        except OSError:
            metrics.MESSAGES.labels("deferred_produce_failed").inc()
            return "local spool write failed"
        _SPOOLED.inc()
        log.info("spooled %d event(s) (%s)", len(records), why)
        return None

    async def handle_exception(self, error: Exception) -> str:
        # The type only: an exception's text could quote message data.
        log.error("SMTP session error: %s", type(error).__name__)
        return "451 4.3.0 Internal error, try again later"


def encode_event(event: schema.Event) -> bytes:
    """The event's record. Text no encoder takes (a lone surrogate) is replaced rather than
    costing the event: header decoding should never produce it, and this is the backstop."""
    try:
        return schema.encode_event(event)
    except TypeError:  # orjson.JSONEncodeError
        metrics.EVENTS_SCRUBBED.inc()
        for f in dataclasses.fields(event):
            value = getattr(event, f.name)
            if isinstance(value, str):
                setattr(event, f.name, scrub_text(value))
            elif isinstance(value, list):
                setattr(event, f.name, [scrub_text(v) if isinstance(v, str) else v for v in value])
        return schema.encode_event(event)


def _dsn_params(server: SMTP) -> MailDsn | RcptDsn | DsnParamError | None:
    """The DSN parameters our protocol took out of the command being handled."""
    return server.dsn_params if isinstance(server, FrontEndSMTP) else None


def _close_after_reply(server: SMTP) -> None:
    # aiosmtpd writes our reply right after the hook returns, before yielding to the loop,
    # so a callback scheduled now closes the connection after the 421 is on its way.
    transport = server.transport
    if transport is not None:
        asyncio.get_running_loop().call_soon(transport.close)
