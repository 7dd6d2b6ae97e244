"""Delivery status notifications (RFC 3464) to a customer's bounce address: a status event
for the *original* message (``bounced`` / ``deferred`` / ``delivered``).

Only the report's top-level header, its ``message/delivery-status`` part and the
``Message-ID`` of a ``text/rfc822-headers`` part are read. The returned message itself
(``message/rfc822``) and the human-readable part are never read into an event. The DSN is
parsed with the stdlib ``email`` parser from at most :data:`MAX_PARSE_BYTES` of its content,
off the event loop (:func:`parse_dsn_bounded`): that parser checks every line against every
open boundary, so a report nested hundreds of levels deep costs seconds of CPU. A report
declaring more than :data:`MAX_BOUNDARIES` multipart boundaries or :data:`MAX_PARTS` part
delimiters is not parsed at all, and a parse is waited for at most :data:`PARSE_TIME_LIMIT`
seconds: such a mail is still accepted and recorded like any other, without status events.

The original message is found by, in this order:

1. the ``Message-ID`` in the ``text/rfc822-headers`` part;
2. the ``Original-Envelope-Id`` (the ENVID the sender gave in ``MAIL FROM``, RFC 3461) when
   it is a Message-ID (``local@domain``, angle brackets optional);
3. a VERP recipient: ``LOCAL+TOKEN@DOMAIN``, where ``LOCAL@DOMAIN`` is a bounce address or
   ``DOMAIN`` a bounce domain, and TOKEN is the original Message-ID without its angle brackets
   and with its ``@`` written as ``=`` (the last ``=`` stands for the ``@``):
   ``bounce+20250701.abc=mail.demo.example@bounces.demo.example`` names
   ``<20250701.abc@mail.demo.example>``.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesFeedParser

from mailmeta import schema
from mailmeta.config import Customers
from mailmeta.ingest._extract import (
    MAX_MESSAGE_ID,
    header_block,
    now_ms,
    scan_headers,
)

# The delivery-status part comes second, after a short human-readable part; a DSN's
# returned message may be as large as any mail, and is never needed.
MAX_PARSE_BYTES = 256 * 1024
MAX_RECIPIENT_BLOCKS = 100
# A real DSN declares two or three boundaries (the report, a returned multipart message) and
# a handful of parts; the parse cost grows with lines x open boundaries.
MAX_BOUNDARIES = 10
MAX_PARTS = 500
PARSE_TIME_LIMIT = 2.0
MAX_REPLY = 500
_MAX_ADDRESS = 254

# DSN Action -> event status (RFC 3464 2.3.3).
_ACTIONS = {
    "failed": "bounced",
    "delayed": "deferred",
    "delivered": "delivered",
    "relayed": "delivered",
    "expanded": "delivered",
}
_STATUS_CODE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_CTRL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")
_SPACES = re.compile(r"\s+")
_MSG_ID = re.compile(r"[^\s<>@]{1,900}@[^\s<>@]{1,255}")
_XTEXT = re.compile(r"\+([0-9A-Fa-f]{2})")
_BOUNDARY_PARAM = re.compile(rb"boundary\s*=", re.IGNORECASE)
# Two threads: a flood of reports waits its turn (and its time limit) without holding the
# event loop or the default executor (AUTH's argon2 runs there).
_PARSER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mailmeta-dsn")


class DsnError(ValueError):
    """A multipart/report that is not a usable delivery status notification."""


class BounceRoutes:
    """Which customer a recipient is a bounce address of, and its VERP token."""

    def __init__(self, customers: Customers) -> None:
        self._addresses = {a: c.id for c in customers for a in c.bounce_addresses}
        self._domains = {d: c.id for c in customers for d in c.bounce_domains}

    def __bool__(self) -> bool:
        return bool(self._addresses or self._domains)

    def customer_for(self, address: str) -> str | None:
        """The id of the customer ``address`` is a bounce address of (VERP form included)."""
        local, at, domain = address.rpartition("@")
        if not at:
            return None
        domain = domain.lower().rstrip(".")
        owner = self._domains.get(domain)
        if owner is not None:
            return owner
        base = local.split("+", 1)[0].lower()
        return self._addresses.get(f"{base}@{domain}")

    @staticmethod
    def verp_message_id(address: str) -> str | None:
        """The original Message-ID a VERP address names, or None."""
        local = address.rpartition("@")[0]
        _, plus, token = local.partition("+")
        left, eq, right = token.rpartition("=")
        if not plus or not eq or not left or not right:
            return None
        return _message_id(f"{left}@{right}")


@dataclass(frozen=True, slots=True)
class Dsn:
    """What a DSN says about the original message: one entry per recipient block."""

    original_id: str | None  # from the rfc822-headers part or the ENVID
    recipients: list[tuple[str | None, str, str]]  # (final recipient, status, smtp_reply)


def looks_like_report(content: bytes) -> bool:
    """Cheap pre-check on the header block: only reports are parsed at all."""
    return b"multipart/report" in header_block(content[:MAX_PARSE_BYTES]).lower()


def too_complex(content: bytes) -> str | None:
    """Why ``content`` is beyond the parse bounds, else None (a cheap count, no parse)."""
    head = content[:MAX_PARSE_BYTES]
    if len(_BOUNDARY_PARAM.findall(head)) > MAX_BOUNDARIES:
        return f"more than {MAX_BOUNDARIES} multipart boundaries"
    if head.count(b"\n--") > MAX_PARTS:
        return f"more than {MAX_PARTS} part delimiters"
    return None


async def parse_dsn_bounded(content: bytes) -> Dsn:
    """:func:`parse_dsn` in a worker thread, within the bounds; :class:`DsnError` beyond
    them (the thread of a parse that ran out of time finishes on its own, bounded too)."""
    reason = too_complex(content)
    if reason is not None:
        raise DsnError(reason)
    parse = asyncio.get_running_loop().run_in_executor(_PARSER, parse_dsn, content)
    try:
        return await asyncio.wait_for(parse, PARSE_TIME_LIMIT)
    except TimeoutError:
        raise DsnError(f"not parsed within {PARSE_TIME_LIMIT:g} s") from None


def parse_dsn(content: bytes) -> Dsn:
    """The DSN in ``content``; :class:`DsnError` (with a short reason) when there is none."""
    truncated = len(content) > MAX_PARSE_BYTES
    parser = BytesFeedParser()
    parser.feed(content[:MAX_PARSE_BYTES])
    msg = parser.close()
    if msg.get_content_type() != "multipart/report":
        raise DsnError("not multipart/report")
    if str(msg.get_param("report-type", "")).lower() != "delivery-status":
        raise DsnError("report-type is not delivery-status")
    payload = msg.get_payload()
    if not isinstance(payload, list):
        raise DsnError("report without parts")
    parts = [p for p in payload if isinstance(p, Message)]
    # Direct children only: a returned message may itself be a DSN.
    status_at = next(
        (i for i, p in enumerate(parts) if p.get_content_type() == "message/delivery-status"),
        None,
    )
    if status_at is None:
        raise DsnError("no message/delivery-status part")
    if truncated and status_at == len(parts) - 1:
        raise DsnError("delivery-status part beyond the parse limit")
    status_payload = parts[status_at].get_payload()
    blocks = (
        [b for b in status_payload if isinstance(b, Message)]
        if isinstance(status_payload, list)
        else []
    )
    if len(blocks) < 2:
        raise DsnError("delivery-status part without recipient blocks")

    recipients = []
    for block in blocks[1 : 1 + MAX_RECIPIENT_BLOCKS]:
        action = (_field(block, "action") or "").lower()
        status = _ACTIONS.get(action)
        code = _STATUS_CODE.fullmatch(_field(block, "status") or "")
        if status is None or code is None:
            continue  # a block without a valid Action and Status says nothing usable
        reply = code.group(0)
        diagnostic = _field(block, "diagnostic-code")
        if diagnostic:
            reply = f"{reply} {diagnostic}"
        rcpt = _address(_field(block, "final-recipient") or _field(block, "original-recipient"))
        recipients.append((rcpt, status, reply[:MAX_REPLY]))
    if not recipients:
        raise DsnError("no recipient block with a valid Action and Status")

    original = None
    for i, part in enumerate(parts):
        if part.get_content_type() == "text/rfc822-headers":
            if truncated and i == len(parts) - 1:
                break  # cut off: its Message-ID may be cut too
            headers = part.get_payload(decode=True)
            if isinstance(headers, bytes):
                found = scan_headers(headers + b"\r\n\r\n").get("message-id")
                original = _message_id(found) if found else None
            break
    if original is None:
        envid = _field(blocks[0], "original-envelope-id")
        if envid:
            original = _message_id(_XTEXT.sub(lambda m: chr(int(m.group(1), 16)), envid))
    return Dsn(original, recipients)


def status_events(dsn: Dsn, customer_id: str, bounce_rcpts: list[str]) -> list[schema.Event]:
    """The status events for ``customer_id``: one per (status, reply), listing its
    recipients. :class:`DsnError` when the original message cannot be named."""
    original = dsn.original_id
    if original is None:
        original = next(
            (m for m in map(BounceRoutes.verp_message_id, bounce_rcpts) if m is not None), None
        )
    if original is None:
        raise DsnError("original message not identified (no rfc822-headers, ENVID or VERP)")
    groups: dict[tuple[str, str], list[str]] = {}
    for rcpt, status, reply in dsn.recipients:
        rcpts = groups.setdefault((status, reply), [])
        if rcpt is not None and rcpt not in rcpts:
            rcpts.append(rcpt)
    return [
        schema.Event(
            event_id=schema.new_event_id(),
            received_at=now_ms(),
            customer_id=customer_id,
            status=status,
            rcpt_to=rcpts or None,
            message_id=original,
            smtp_reply=reply,
        )
        for (status, reply), rcpts in groups.items()
    ]


def _field(block: Message, name: str) -> str | None:
    """One DSN field, unfolded, control characters removed, white space collapsed."""
    for key, value in block.raw_items():
        if key.lower() == name:
            text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            text = _SPACES.sub(" ", _CTRL.sub(" ", text)).strip()
            return text[: MAX_REPLY * 2] or None
    return None


def _address(value: str | None) -> str | None:
    """``rfc822; user@example.net`` -> ``user@example.net``."""
    if not value:
        return None
    kind, sep, addr = value.partition(";")
    if not sep or kind.strip().lower() not in ("rfc822", "utf-8"):
        return None
    addr = addr.strip().strip("<>").strip()
    if not addr or len(addr) > _MAX_ADDRESS or "@" not in addr or " " in addr:
        return None
    return addr


def _message_id(value: str) -> str | None:
    """``<local@domain>`` from a Message-ID with or without brackets, else None."""
    text = _CTRL.sub("", value).strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if len(text) + 2 > MAX_MESSAGE_ID or not _MSG_ID.fullmatch(text):
        return None
    return f"<{text}>"
