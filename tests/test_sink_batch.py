"""The sink's columnwise fast path: the same table as per-event decode, or it declines."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from mailmeta.config import Customer, Customers
from mailmeta.schema import Event, decode_event, encode_event, new_event_id
from mailmeta.store import arrow_from_json, to_arrow
from tests.event_helpers import Redacted, raw_event

POLICY = {
    "sender_ip": "truncate_ip",
    "mail_from": "hmac",
    "rcpt_to": "mask",
    "message_id": "keep",
    "subject": "keep",
    "date": "keep",
    "size_bytes": "keep",
    "smtp_reply": "keep",
    "processing_ms": "keep",
    "tls_version": "keep",
}
CUSTOMERS = Customers(
    [
        Customer(
            id=cid,
            domains=[f"{cid}.example"],
            retention_days=days,
            hmac_key=f"{cid}-batch-test-hmac-key-0123456789",
            policy=POLICY,
            policy_version=4,
        )
        for cid, days in [("acme", 60), ("beta", 90)]
    ]
)
RETENTION = {c.id: c.retention_days for c in CUSTOMERS}
rows = Redacted(CUSTOMERS, default="acme")


def event(customer: str = "acme", **fields: Any) -> Event:
    """A stored row whose JSON the tests below patch: a subject beyond ASCII, a whole
    number of milliseconds."""
    return rows(customer, **{"subject": "Grüße ✓ 😀", "processing_ms": 3, **fields})


def test_same_table_as_per_event_decode() -> None:
    events = [
        event(),
        event("beta", rcpt_to=None, size_bytes=None, processing_ms=None),
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
    raw = raw_event("acme")
    ev = rows.of(raw)
    newer = rows.changed("acme", {**POLICY, "subject": "drop"}, 5).of(raw)
    assert arrow_from_json([encode_event(ev), encode_event(newer)], RETENTION) is None
