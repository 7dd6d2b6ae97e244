"""Relay mode: forward a received message unchanged to the next hop over SMTP and report
its verdict. The body lives only in this process's memory for the transaction.

STARTTLS to the next hop whenever it offers it; when TLS is required (a customer with
``require_tls``) and the hop offers none, refuses it or the handshake fails, the message is
deferred (451 4.7.5). A failed handshake otherwise means one more attempt in plaintext, as
opportunistic TLS does (RFC 7435).

The client's DSN parameters (RFC 3461: RET/ENVID, NOTIFY/ORCPT) go on to a hop that offers
DSN and are left off toward one that does not (RFC 3461 5.2.2; the "relayed" notice that
NOTIFY=SUCCESS then asks of us is not sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from mailmeta.config import parse_host_port
from mailmeta.ingest._dsn_params import MailDsn, RcptDsn

log = logging.getLogger("mailmeta.ingest.relay")

_MAX_REPLY_TEXT = 400


@dataclass(frozen=True, slots=True)
class RelayReply:
    code: int
    text: str  # enhanced status code and text, one line, printable ASCII
    tls_version: str | None = None  # of the connection to the next hop, None: plaintext

    @property
    def status(self) -> str:
        """The event status this reply means."""
        if 200 <= self.code < 300:
            return "delivered"
        if 400 <= self.code < 500:
            return "deferred"
        return "bounced"

    @property
    def line(self) -> str:
        return f"{self.code} {self.text}".rstrip()

    @property
    def event_line(self) -> str:
        """The event's ``smtp_reply``: the hop's reply, and how it was reached when that
        was over TLS (`` (next hop: TLSv1.3)``); the schema has one ``tls_version``, the
        inbound one."""
        if self.tls_version is None:
            return self.line
        return f"{self.line} (next hop: {self.tls_version})"


_UNSAFE = RelayReply(501, "5.5.2 control character in envelope, not relayed")
_NO_STARTTLS = RelayReply(451, "4.7.5 TLS required, but the next hop offers no STARTTLS")
_TLS_FAILED = RelayReply(451, "4.7.5 TLS required, but the TLS handshake with the next hop failed")


class _TlsFailed(Exception):
    """The next hop accepted STARTTLS but the handshake failed: the connection is gone."""


class _ReplyError(Exception):
    def __init__(self, reply: RelayReply) -> None:
        super().__init__(reply.line)
        self.reply = reply


def _printable(text: str) -> str:
    # Upstream text goes back to our client and into events: one bounded ASCII line.
    out = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return out[:_MAX_REPLY_TEXT]


def dot_stuff(content: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency, plus the end-of-data line."""
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"


class UnsafeCommand(ValueError):
    """A command part holds a control or non-ASCII character: never sent."""


def command_line(verb: str, *parts: str) -> bytes:
    """One outbound command from its parts, each printable ASCII (no CR, LF, NUL or other
    control): a next hop must never read part of an argument as a command of ours."""
    for part in (verb, *parts):
        if not all(" " <= ch <= "~" for ch in part):
            raise UnsafeCommand(f"unsafe character in {verb} command")
    return ("".join((verb, *parts)) + "\r\n").encode("ascii")


class _Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.extensions: set[str] = set()
        self.tls_version: str | None = None

    async def _lines(self) -> tuple[int, list[str]]:
        """One (possibly multi-line) reply: its code and the text of each line."""
        lines: list[str] = []
        while True:
            raw = await self.reader.readuntil(b"\n")
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit():
                raise ConnectionError("next hop sent a malformed reply")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    async def reply(self) -> RelayReply:
        code, lines = await self._lines()
        return RelayReply(code, _printable(" ".join(lines).strip()), self.tls_version)

    async def command(self, verb: str, *parts: str) -> RelayReply:
        self.writer.write(command_line(verb, *parts))
        return await self.reply()

    async def expect(self, verb: str, *parts: str, ok: range = range(200, 300)) -> RelayReply:
        reply = await self.command(verb, *parts)
        if reply.code not in ok:
            raise _ReplyError(reply)
        return reply

    async def ehlo(self, helo: str) -> None:
        self.extensions = set()
        self.writer.write(command_line("EHLO ", helo))
        code, lines = await self._lines()
        if code // 100 != 2:  # no ESMTP: plain HELO
            await self.expect("HELO ", helo)
            return
        self.extensions = {ln.split(" ", 1)[0].upper() for ln in lines[1:]}

    async def starttls(self, helo: str, context: ssl.SSLContext, host: str) -> bool:
        """STARTTLS and a new EHLO (RFC 3207: what was said in plaintext is forgotten).
        False when the hop refuses the command (the session goes on in plaintext)."""
        if (await self.command("STARTTLS")).code != 220:
            return False
        try:
            await self.writer.start_tls(context, server_hostname=host)
        except (OSError, ConnectionError, ssl.CertificateError) as exc:
            # ssl.SSLError is an OSError; its reason names the failure, never message data.
            reason = getattr(exc, "reason", None) or type(exc).__name__
            log.info("TLS handshake with next hop %s failed: %s", host, reason)
            raise _TlsFailed from None
        obj = self.writer.get_extra_info("ssl_object")
        self.tls_version = str(obj.version()) if obj is not None and obj.version() else "TLS"
        await self.ehlo(helo)
        return True


async def relay(
    next_hop: str,
    *,
    helo: str,
    mail_from: str,
    rcpt_to: list[str],
    content: bytes,
    time_limit: float = 60.0,
    tls: ssl.SSLContext | None = None,
    require_tls: bool = False,
    dsn: MailDsn | None = None,
    rcpt_dsn: Mapping[str, RcptDsn] | None = None,
) -> RelayReply:
    """Deliver one message to ``next_hop`` ("HOST:PORT"); the reply to its DATA (or the
    first refusal) is the verdict. Connection problems are a 451 (deferred). ``tls``: the
    context for STARTTLS when the hop offers it (None: never); ``require_tls``: no
    delivery without it. ``dsn``/``rcpt_dsn``: the client's DSN parameters of MAIL and of
    each recipient, passed on when the hop offers DSN."""
    host, port = parse_host_port(next_hop)
    try:
        for part in (helo, mail_from, *rcpt_to):
            command_line("", part)  # refused before connecting
    except UnsafeCommand:
        return _UNSAFE
    args = (helo, mail_from, rcpt_to, content, _Dsn(dsn, rcpt_dsn or {}))
    try:
        async with asyncio.timeout(time_limit):
            try:
                return await _session(host, port, *args, tls=tls, require_tls=require_tls)
            except _TlsFailed:
                if require_tls:
                    return _TLS_FAILED
                return await _session(host, port, *args, tls=None, require_tls=False)
    except _ReplyError as exc:
        return exc.reply
    except UnsafeCommand:
        return _UNSAFE
    except TimeoutError:
        return RelayReply(451, "4.4.2 next hop timed out")
    except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return RelayReply(451, "4.4.1 next hop unreachable")


@dataclass(frozen=True, slots=True)
class _Dsn:
    mail: MailDsn | None
    rcpt: Mapping[str, RcptDsn]


async def _session(
    host: str,
    port: int,
    helo: str,
    mail_from: str,
    rcpt_to: list[str],
    content: bytes,
    dsn: _Dsn,
    *,
    tls: ssl.SSLContext | None,
    require_tls: bool,
) -> RelayReply:
    reader, writer = await asyncio.open_connection(host, port, limit=64 * 1024)
    client = _Client(reader, writer)
    try:
        greeting = await client.reply()
        if greeting.code != 220:
            raise _ReplyError(greeting)
        await client.ehlo(helo)
        if tls is not None and "STARTTLS" in client.extensions:
            await client.starttls(helo, tls, host)
        if require_tls and client.tls_version is None:
            await _quit(client)
            return _NO_STARTTLS
        return await _transaction(client, mail_from, rcpt_to, content, dsn)
    finally:
        # The writer of the TLS layer when STARTTLS replaced the transport.
        client.writer.close()
        with contextlib.suppress(OSError, asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(client.writer.wait_closed(), 1.0)


async def _transaction(
    client: _Client, mail_from: str, rcpt_to: list[str], content: bytes, dsn: _Dsn
) -> RelayReply:
    params = ""
    if "SIZE" in client.extensions:
        params += f" SIZE={len(content)}"
    if "8BITMIME" in client.extensions and not content.isascii():
        params += " BODY=8BITMIME"
    with_dsn = "DSN" in client.extensions
    if with_dsn and dsn.mail is not None:
        params += dsn.mail.params()
    await client.expect("MAIL FROM:<", mail_from, ">", params)
    refusals: list[RelayReply] = []
    for rcpt in rcpt_to:
        options = dsn.rcpt.get(rcpt) if with_dsn else None
        reply = await client.command("RCPT TO:<", rcpt, ">", options.params() if options else "")
        if reply.code // 100 != 2:
            refusals.append(reply)
    if refusals:
        # All or nothing: our client already has a 250 for every recipient, so a partial
        # delivery would silently drop the refused ones. A temporary refusal wins (the
        # client retries the whole message); otherwise the first permanent one.
        await _quit(client)
        temporary = [r for r in refusals if r.code // 100 == 4]
        return temporary[0] if temporary else refusals[0]
    await client.expect("DATA", ok=range(354, 355))
    client.writer.write(dot_stuff(content))
    verdict = await client.reply()
    await _quit(client)
    return verdict


async def _quit(client: _Client) -> None:
    with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
        client.writer.write(b"QUIT\r\n")
        await asyncio.wait_for(client.reply(), 2.0)
