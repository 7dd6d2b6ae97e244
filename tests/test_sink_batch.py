"""The sink's columnwise fast path: the same table as per-event decode, or it declines."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from mailmeta.schema import Event, decode_event, encode_event, format_time, new_event_id
from mailmeta.store import arrow_from_json, to_arrow

RETENTION = {"acme": 60, "beta": 90}


def event(**fields: Any) -> Event:
    values: dict[str, Any] = {
        "event_id": new_event_id(),
        "received_at": format_time(datetime.now(UTC)),
        "customer_id": "acme",
        "status": "delivered",
        "sender_ip": "198.51.100.0/24",
        "mail_from": "k1:abc",
        "rcpt_to": ["a***@example.com"],
        "message_id": "<x@mx.example>",
        "subject": "Grüße ✓ 😀",
        "date": "Tue, 1 Jul 2003 10:52:37 +0200",
        "size_bytes": 2048,
        "smtp_reply": "250 Ok",
        "processing_ms": 3,
        "tls_version": "TLSv1.3",
        "policy_version": 4,
    }
    values.update(fields)
    return Event(**values)


def test_same_table_as_per_event_decode() -> None:
    events = [
        event(),
        event(customer_id="beta", rcpt_to=None, size_bytes=None, processing_ms=None),
        event(event_id=new_event_id().upper(), size_bytes=(1 << 64) - 1, subject=None),
    ]
    values = [encode_event(e) for e in events]
    fast = arrow_from_json(values, RETENTION)
    assert fast is not None
    assert fast.equals(to_arrow([decode_event(v) for v in values], RETENTION))


def patched(**fields: Any) -> bytes:
    obj = event().to_dict()
    obj.update(fields)
    return orjson.dumps(obj)


@pytest.mark.parametrize(
    "bad",
    [
        patched(surprise=1),  # unknown field
        patched(policy_version=None),  # not redacted
        patched(customer_id="nobody"),
        patched(status=""),
        patched(event_id="123"),
        patched(received_at="2026-01-02T03:04:05+00:00"),  # valid, but not canonical
        patched(received_at="2026-02-30T03:04:05.000Z"),
        patched(received_at="1800-01-02T03:04:05.000Z"),
        patched(size_bytes=1.0),
        patched(rcpt_to=["a", None]),
        patched(subject=5),
        patched().replace(b'"processing_ms":3', b'"processing_ms":NaN'),
        patched() + b" " + patched(),  # two objects in one record
        patched().replace(b"Gr\xc3\xbc", b"Gr\xff"),  # not UTF-8
        b"not json",
        b"[1]",
    ],
)
def test_declines_a_batch_with_any_record_it_cannot_vouch_for(bad: bytes) -> None:
    good = [encode_event(event()) for _ in range(3)]
    assert arrow_from_json(good, RETENTION) is not None
    assert arrow_from_json([good[0], bad, *good[1:]], RETENTION) is None


def test_declines_duplicates_so_the_newest_policy_copy_wins() -> None:
    ev = event()
    newer = event(event_id=ev.event_id, policy_version=5)
    assert arrow_from_json([encode_event(ev), encode_event(newer)], RETENTION) is None
