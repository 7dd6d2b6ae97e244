"""Event schema v1 — the only contract between ingest, streams and sinks.

One event per message (per customer it was addressed to). Each stage decodes what the
previous one produced with :func:`decode_event` and encodes with :func:`encode_event`;
both refuse any key that is not a schema field, so no other header, and never the body,
can travel downstream.

Events are JSON objects (orjson). Times are ISO-8601 UTC strings with millisecond precision.
Beside events, the topics carry *control records* (a drain marker used for graceful
shutdown); they are recognised by their ``_control`` key and are never stored.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Container
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import orjson

SCHEMA_VERSION = 1

# Topic names (the defaults; settings may prefix them).
RAW_TOPIC = "mailmeta.raw"
REDACTED_TOPIC = "mailmeta.redacted"
DEADLETTER_TOPIC = "mailmeta.deadletter"

# Fields a policy cannot remove: without them an event cannot be stored, expired or counted.
ALWAYS_KEPT = frozenset({"event_id", "received_at", "customer_id", "status"})

# "expired": Postfix gave up on a deferred recipient (queue lifetime over; from its log).
STATUSES = frozenset({"accepted", "delivered", "deferred", "bounced", "expired", "rejected"})


class SchemaError(ValueError):
    """A record that is not a valid schema-v1 event."""


@dataclass(slots=True)
class Event:
    event_id: str
    received_at: str
    customer_id: str
    status: str
    sender_ip: str | None = None
    helo: str | None = None
    mail_from: str | None = None
    rcpt_to: list[str] | None = field(default=None)
    message_id: str | None = None
    subject: str | None = None
    date: str | None = None
    size_bytes: int | None = None
    smtp_reply: str | None = None
    processing_ms: float | None = None
    tls_version: str | None = None
    # Set by the redaction stage; None on the raw topic.
    policy_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELD_NAMES}


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Event))
_FIELD_SET = frozenset(FIELD_NAMES)
_REQUIRED = ("event_id", "received_at", "customer_id", "status")
_STR_FIELDS = frozenset(
    {
        "sender_ip",
        "helo",
        "mail_from",
        "message_id",
        "subject",
        "date",
        "smtp_reply",
        "tls_version",
    }
)


def encode_event(event: Event) -> bytes:
    return orjson.dumps(event.to_dict())


def decode_event(data: bytes | str) -> Event:
    """Parse and validate one event; raises :class:`SchemaError` with the reason."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise SchemaError("event is not a JSON object")
    return event_from_dict(obj)


def event_from_dict(obj: dict[str, Any]) -> Event:
    extra = obj.keys() - _FIELD_SET
    if extra:
        raise SchemaError(f"unknown field(s): {', '.join(sorted(extra))}")
    for name in _REQUIRED:
        value = obj.get(name)
        if not isinstance(value, str) or not value:
            raise SchemaError(f"field {name!r} is required and must be a non-empty string")
    for name in _STR_FIELDS:
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise SchemaError(f"field {name!r} must be a string or null")
    rcpt = obj.get("rcpt_to")
    if rcpt is not None and (
        not isinstance(rcpt, list) or not all(isinstance(r, str) for r in rcpt)
    ):
        raise SchemaError("field 'rcpt_to' must be a list of strings or null")
    for name in ("size_bytes", "policy_version"):
        value = obj.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise SchemaError(f"field {name!r} must be an integer or null")
    pm = obj.get("processing_ms")
    if pm is not None and (not isinstance(pm, int | float) or isinstance(pm, bool)):
        raise SchemaError("field 'processing_ms' must be a number or null")
    try:
        parse_time(obj["received_at"])
    except ValueError:
        raise SchemaError("field 'received_at' is not an ISO-8601 time") from None
    return Event(**obj)


# --- the fast check -----------------------------------------------------------------------

_FIELDS = frozenset(FIELD_NAMES)
_REQUIRED = ("event_id", "received_at", "customer_id", "status")
_OPTIONAL_STR = tuple(f.name for f in fields(Event) if f.type == "str | None")


def plainly_valid(obj: dict[str, Any]) -> bool:
    """True only for events ``schema.event_from_dict`` accepts; False when in doubt.

    The hot path's check (the redaction worker): orjson gives exact types, so ``type() is``
    suffices, and no Event is built. Anything it does not accept goes to event_from_dict for
    the verdict and the reason, so it can only be stricter, never looser (tests compare them).
    """
    if not _FIELDS.issuperset(obj):
        return False
    get = obj.get
    for name in _REQUIRED:
        v = get(name)
        if type(v) is not str or not v:
            return False
    for name in _OPTIONAL_STR:
        v = get(name)
        if v is not None and type(v) is not str:
            return False
    rcpt = get("rcpt_to")
    if rcpt is not None and (type(rcpt) is not list or any(type(r) is not str for r in rcpt)):
        return False
    for name in ("size_bytes", "policy_version"):
        v = get(name)
        if v is not None and type(v) is not int:
            return False
    v = get("processing_ms")
    if v is not None and type(v) is not float and type(v) is not int:
        return False
    try:
        parse_time(obj["received_at"])
    except ValueError:
        return False
    return True


# --- time ---------------------------------------------------------------------------------


def format_time(dt: datetime) -> str:
    """UTC, millisecond precision, ``Z`` suffix; a naive datetime is taken as UTC."""
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_time(value: str) -> datetime:
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def to_utc(dt: datetime | None) -> datetime | None:
    """Aware UTC: a naive datetime is taken as UTC (ClickHouse and query strings give both)."""
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def now_ms() -> str:
    return format_time(datetime.now(UTC))


# --- ids ----------------------------------------------------------------------------------


def new_event_id() -> str:
    """A UUIDv7 (RFC 9562): time-ordered, so ids sort like the events arrived."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a (12 bits)
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b
    return str(uuid.UUID(int=value))


# --- dead letters ------------------------------------------------------------------------

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What every stage writes to the dead-letter topic for a record it cannot process: why,
    which event and where the record is, never its payload (which may hold clear metadata,
    and the dead-letter topic keeps days): ``topic``/``partition``/``offset`` find it while
    its own topic keeps it."""

    reason: str
    topic: str
    partition: int
    offset: int
    event_id: str | None = None
    customer_id: str | None = None

    @classmethod
    def of(
        cls,
        obj: object,
        reason: str,
        where: tuple[str, int, int],
        customers: Container[str],
    ) -> DeadLetter:
        """The dead letter of ``obj`` (the record as decoded, if at all) at ``where`` (topic,
        partition, offset). Its ids are kept only in the shape mailmeta mints (a UUID, one
        of ``customers``), so a malformed record cannot smuggle a value into them."""
        event_id = customer_id = None
        if isinstance(obj, Event):
            obj = {"event_id": obj.event_id, "customer_id": obj.customer_id}
        if isinstance(obj, dict):
            eid, cid = obj.get("event_id"), obj.get("customer_id")
            if isinstance(eid, str) and _UUID.fullmatch(eid):
                event_id = eid
            if isinstance(cid, str) and cid in customers:
                customer_id = cid
        topic, partition, offset = where
        return cls(reason[:500], topic, partition, offset, event_id, customer_id)

    def value(self) -> bytes:
        return orjson.dumps(
            {
                "reason": self.reason,
                "event_id": self.event_id,
                "customer_id": self.customer_id,
                "topic": self.topic,
                "partition": self.partition,
                "offset": self.offset,
            }
        )

    def key(self) -> bytes | None:
        return self.event_id.encode() if self.event_id else None

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("mailmeta-error", self.reason.encode()),
            ("mailmeta-source", f"{self.topic}/{self.partition}@{self.offset}".encode()),
        ]


# --- control records ----------------------------------------------------------------------


def encode_drain_marker(nonce: str, source_partition: int | None = None) -> bytes:
    obj: dict[str, Any] = {"_control": "drain", "nonce": nonce}
    if source_partition is not None:
        obj["from"] = source_partition
    return orjson.dumps(obj)


def control_of(data: bytes) -> dict[str, Any] | None:
    """The control record in ``data``, or None when it is an ordinary event."""
    if not data.startswith(b'{"_control"'):
        return None
    obj = orjson.loads(data)
    return obj if isinstance(obj, dict) else None
