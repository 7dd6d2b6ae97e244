"""Relay mode: forward a received message unchanged to the next hop over SMTP and report
its verdict. The body lives only in this process's memory for the transaction."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from mailmeta.config._models import parse_host_port

_MAX_REPLY_TEXT = 400


@dataclass(frozen=True, slots=True)
class RelayReply:
    code: int
    text: str  # enhanced status code and text, one line, printable ASCII

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


class _Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.extensions: set[str] = set()

    async def reply(self) -> RelayReply:
        lines: list[str] = []
        while True:
            raw = await self.reader.readuntil(b"\n")
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit():
                raise ConnectionError("next hop sent a malformed reply")
            lines.append(line[4:])
            if line[3:4] != "-":
                return RelayReply(int(line[:3]), _printable(" ".join(lines).strip()))

    async def command(self, line: str) -> RelayReply:
        self.writer.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return await self.reply()

    async def expect(self, line: str, ok: range = range(200, 300)) -> RelayReply:
        reply = await self.command(line)
        if reply.code not in ok:
            raise _ReplyError(reply)
        return reply

    async def ehlo(self, helo: str) -> None:
        self.writer.write(f"EHLO {helo}\r\n".encode())
        reply = await self.reply_lines()
        if reply is None:  # no ESMTP: plain HELO
            await self.expect(f"HELO {helo}")

    async def reply_lines(self) -> RelayReply | None:
        lines: list[str] = []
        while True:
            raw = await self.reader.readuntil(b"\n")
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit():
                raise ConnectionError("next hop sent a malformed reply")
            lines.append(line[4:])
            if line[3:4] != "-":
                break
        if not line.startswith("2"):
            return None
        self.extensions = {ln.split(" ", 1)[0].upper() for ln in lines[1:]}
        return RelayReply(int(line[:3]), "")


async def relay(
    next_hop: str,
    *,
    helo: str,
    mail_from: str,
    rcpt_to: list[str],
    content: bytes,
    time_limit: float = 60.0,
) -> RelayReply:
    """Deliver one message to ``next_hop`` ("HOST:PORT"); the reply to its DATA (or the
    first refusal) is the verdict. Connection problems are a 451 (deferred)."""
    host, port = parse_host_port(next_hop)
    try:
        async with asyncio.timeout(time_limit):
            reader, writer = await asyncio.open_connection(host, port, limit=64 * 1024)
            try:
                return await _transaction(
                    _Client(reader, writer), helo, mail_from, rcpt_to, content
                )
            finally:
                writer.close()
                with contextlib.suppress(OSError, asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)
    except _ReplyError as exc:
        return exc.reply
    except TimeoutError:
        return RelayReply(451, f"4.4.2 next hop {next_hop} timed out")
    except (OSError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return RelayReply(451, f"4.4.1 next hop {next_hop} unreachable")


async def _transaction(
    client: _Client, helo: str, mail_from: str, rcpt_to: list[str], content: bytes
) -> RelayReply:
    greeting = await client.reply()
    if greeting.code != 220:
        raise _ReplyError(greeting)
    await client.ehlo(helo)
    params = ""
    if "SIZE" in client.extensions:
        params += f" SIZE={len(content)}"
    if "8BITMIME" in client.extensions and not content.isascii():
        params += " BODY=8BITMIME"
    await client.expect(f"MAIL FROM:<{mail_from}>{params}")
    refusals: list[RelayReply] = []
    for rcpt in rcpt_to:
        reply = await client.command(f"RCPT TO:<{rcpt}>")
        if reply.code // 100 != 2:
            refusals.append(reply)
    if refusals:
        # All or nothing: our client already has a 250 for every recipient, so a partial
        # delivery would silently drop the refused ones. A temporary refusal wins (the
        # client retries the whole message); otherwise the first permanent one.
        await _quit(client)
        temporary = [r for r in refusals if r.code // 100 == 4]
        return temporary[0] if temporary else refusals[0]
    await client.expect("DATA", range(354, 355))
    client.writer.write(dot_stuff(content))
    verdict = await client.reply()
    await _quit(client)
    return verdict


async def _quit(client: _Client) -> None:
    with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
        client.writer.write(b"QUIT\r\n")
        await asyncio.wait_for(client.reply(), 2.0)
