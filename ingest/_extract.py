"""From an SMTP transaction to schema events: only allow-listed header fields, never the body.

Only the header block (everything before the first empty line) is scanned, so the body is
never parsed, decoded or copied. Header values other than Message-ID, Subject
and Date are never read.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from mailmeta import schema

# Bounds on what we copy out of a header, so one absurd header cannot bloat every stage.
MAX_SUBJECT = 2000
MAX_MESSAGE_ID = 998
MAX_HELO = 255

# RFC 5322 unfolding: a line break followed by white space is just that white space.
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# Any other control character left after unfolding (stray CR/LF, NUL, ...).
_CTRL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class HeaderFields:
    message_id: str | None
    subject: str | None
    date: str | None


def has_bare_newline(content: bytes) -> bool:
    """True when DATA holds a CR or LF that is not part of a CRLF pair (SMTP smuggling)."""
    crlf = content.count(b"\r\n")
    return content.count(b"\n") != crlf or content.count(b"\r") != crlf


def header_block(content: bytes) -> bytes:
    """The bytes up to and including the empty line that ends the headers."""
    if content.startswith(b"\r\n"):
        return b""
    end = content.find(b"\r\n\r\n")
    return content if end < 0 else content[: end + 4]


def extract_headers(content: bytes) -> HeaderFields:
    """Message-ID, Subject and Date from the header block; whatever cannot be parsed is None."""
    try:
        raw = scan_headers(header_block(content))
    except Exception:  # never let a message crash DATA
        return HeaderFields(None, None, None)
    return HeaderFields(
        message_id=_safely(_message_id, raw.get("message-id")),
        subject=_safely(_subject, raw.get("subject")),
        date=_safely(_date, raw.get("date")),
    )


_WANTED = ("message-id", "subject", "date")
# What the compat32 feed parser accepts as a header line (email.feedparser.headerRE); the
# first line that is none of these ends the header block.
_HEADER_LINE = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")


def scan_headers(block: bytes) -> dict[str, str]:
    """The first Message-ID, Subject and Date as written, folds removed.

    A direct scan with the same rules as ``email``'s compat32 parser (a test compares the
    two on odd inputs) at a fraction of its cost: only the three wanted values are ever
    decoded, no other header is read into a string.
    """
    out: dict[str, str] = {}
    key: bytes | None = None  # the header being collected, when wanted
    parts: list[bytes] = []
    current = False  # a header is open (continuation lines belong to it)

    def finish() -> None:
        if key is not None:
            name = key.decode("ascii")
            if name not in out:
                # RFC 6532: 8-bit header text is UTF-8.
                out[name] = _FOLD.sub("", b"".join(parts).decode("utf-8", "replace"))

    for line in block.splitlines():
        if not line or not _HEADER_LINE.match(line):
            break
        if line[0] in b" \t":
            if current and key is not None:
                parts.append(b"\r\n" + line)
            continue
        finish()
        key, parts, current = None, [], False
        i = line.find(b":")
        if line.startswith(b"From ") or i <= 0:
            continue  # a Unix From line or a header without a name: skipped, like compat32
        current = True
        name = line[:i].strip().lower()
        if name in _WANTED_BYTES:
            key, parts = name, [line[i + 1 :].lstrip(b" \t")]
    finish()
    return out


_WANTED_BYTES = frozenset(w.encode() for w in _WANTED)


def _safely(parse: Callable[[str], str | None], raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        return parse(raw)
    except Exception:  # one unparsable field must not cost the others, nor the event
        return None


def _clean(text: str, limit: int) -> str | None:
    text = _CTRL.sub("", text).strip()
    return text[:limit] or None


def _message_id(raw: str) -> str | None:
    return _clean(raw, MAX_MESSAGE_ID)


def _subject(raw: str) -> str | None:
    return _clean(decode_rfc2047(raw), MAX_SUBJECT)


def decode_rfc2047(value: str) -> str:
    """Decode RFC 2047 encoded-words one by one, keeping what decodes.

    Unlike ``email.header.decode_header``, one broken word does not cost the whole value:
    bad bytes become U+FFFD, a charset that is not a mail charset (:data:`MAIL_CHARSETS`:
    rot13, base64, unicode_escape, utf-7 …) is read as UTF-8 or else Latin-1, and a word
    that cannot be decoded at all stays as written. The result holds no lone surrogate
    (each becomes U+FFFD): an event must always be encodable.
    """
    out: list[str] = []
    pos = 0
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos : m.start()]
        # White space between two adjacent encoded words is not part of the text.
        if pos == 0 or gap.strip(" \t"):
            out.append(gap)
        out.append(_decode_word(m))
        pos = m.end()
    out.append(value[pos:])
    return scrub_text("".join(out))


def scrub_text(text: str) -> str:
    """``text`` with each lone surrogate (which no encoder takes) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")


def _decode_word(m: re.Match[str]) -> str:
    charset, encoding, text = m.group(1).split("*", 1)[0], m.group(2).upper(), m.group(3)
    try:
        if encoding == "B":
            # Lenient: characters outside the alphabet are skipped, padding is completed.
            data = base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
        else:
            data = binascii.a2b_qp(text.encode("ascii", "replace"), header=True)
    except (binascii.Error, ValueError):
        return m.group(0)
    if _is_mail_charset(charset):
        try:
            return data.decode(charset, "replace")
        except (UnicodeError, ValueError, TypeError, LookupError):
            pass  # read like an unknown charset
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


# The charsets mail uses (IANA names, as Python's codec registry names them), and only
# these: "any Python text codec" includes unicode_escape and utf-7, which turn a word into
# lone surrogates no encoder takes (a Subject must never cost the event).
MAIL_CHARSETS = frozenset(
    {"ascii", "utf-8", "utf-16", "utf-16-be", "utf-16-le", "utf-32", "utf-32-be", "utf-32-le"}
    | {f"iso8859-{n}" for n in (*range(1, 12), 13, 14, 15, 16)}
    | {f"cp{n}" for n in (*range(1250, 1259), 437, 850, 852, 866, 874, 932, 949, 950)}
    | {"koi8-r", "koi8-u", "tis-620", "mac-roman", "hz", "johab"}
    | {"iso2022_jp", "iso2022_jp_1", "iso2022_jp_2", "iso2022_jp_3", "iso2022_kr"}
    | {"shift_jis", "shift_jisx0213", "euc_jp", "euc_jisx0213", "euc_kr"}
    | {"gb2312", "gbk", "gb18030", "big5", "big5hkscs"}
)
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@functools.lru_cache(maxsize=256)
def _is_mail_charset(charset: str) -> bool:
    label = charset.strip().lower()
    if label.startswith("windows-"):
        label = "cp" + label.removeprefix("windows-")
    try:
        return codecs.lookup(label).name in MAIL_CHARSETS
    except LookupError:
        return False


def _date(raw: str) -> str | None:
    try:
        dt = parsedate_to_datetime(raw.strip())
    except Exception:  # ValueError, TypeError, IndexError, OverflowError for garbage dates
        return None
    if dt.tzinfo is None:
        # "-0000" (and no zone) means the zone is unknown; UTC is the honest reading.
        dt = dt.replace(tzinfo=UTC)
    try:
        return schema.format_time(dt)
    except (ValueError, OverflowError):  # years out of range once shifted to UTC
        return None


def peer_ip(peer: object) -> str | None:
    """The client's IP from aiosmtpd's session.peer; IPv4-mapped IPv6 shown as IPv4."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None
    host = peer[0]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def clean_helo(helo: object) -> str | None:
    if not isinstance(helo, str):
        return None
    return _clean(helo, MAX_HELO)


def envelope_sender(mail_from: object) -> str:
    """The envelope sender; the null sender ``<>`` (bounces) is stored as ""."""
    if not isinstance(mail_from, str) or mail_from in ("<>", ""):
        return ""
    return mail_from


_second: tuple[int, str] = (-1, "")


def now_ms() -> str:
    """``schema.now_ms()`` with the formatted second cached: strftime per event showed in
    profiles, and events arrive hundreds per second."""
    global _second
    ns = time.time_ns()
    sec, ms = divmod(ns // 1_000_000, 1000)
    if _second[0] != sec:
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_second[1]}.{ms:03d}Z"


def accepted_reply(event_ids: list[str]) -> str:
    return "250 2.0.0 Ok: queued as " + " ".join(event_ids)


def build_event(
    *,
    event_id: str,
    customer_id: str,
    headers: HeaderFields,
    rcpt_to: list[str],
    mail_from: str,
    sender_ip: str | None,
    helo: str | None,
    size_bytes: int,
    processing_ms: float,
    tls_version: str | None,
) -> schema.Event:
    return schema.Event(
        event_id=event_id,
        received_at=now_ms(),
        customer_id=customer_id,
        status="accepted",
        sender_ip=sender_ip,
        helo=helo,
        mail_from=mail_from,
        rcpt_to=rcpt_to,
        message_id=headers.message_id,
        subject=headers.subject,
        date=headers.date,
        size_bytes=size_bytes,
        # Each customer's event names only its own queue id: the ids of the other
        # customers' events for the same message are theirs, not this customer's.
        smtp_reply=accepted_reply([event_id]),
        processing_ms=processing_ms,
        tls_version=tls_version,
    )
