"""Stored rows as production makes them: a raw event as ingest builds it (clear sender,
recipients, subject, client IP …) through the real redactor under the customer's policy
and HMAC key. Tests that need particular stored values choose the raw input and the
policy, never the redacted forms: a hand-written hash once hid a broken search."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from mailmeta.config import Customers, Policy
from mailmeta.policy import Redactor, hmac_tagged, stored_forms
from mailmeta.schema import Event, format_time, new_event_id


def raw_event(customer: str, age: timedelta = timedelta(0), **fields: Any) -> Event:
    """A raw event (every field clear, no policy version) ``age`` old; ``fields`` override
    the defaults, ``None`` leaves a field out as a message without it would."""
    values: dict[str, Any] = {
        "event_id": new_event_id(),
        "received_at": format_time(datetime.now(UTC) - age),
        "customer_id": customer,
        "status": "delivered",
        "sender_ip": "198.51.100.7",
        "helo": "mx.sender.example",
        "mail_from": "alice@sender.example",
        "rcpt_to": [f"bob@{customer}.example"],
        "message_id": f"<{uuid.uuid4().hex}@mx.example>",
        "subject": "Quarterly report",
        "date": "Tue, 1 Jul 2003 10:52:37 +0200",
        "size_bytes": 1000,
        "processing_ms": 3.25,
        "tls_version": "TLSv1.3",
    }
    values.update(fields)
    values.setdefault("smtp_reply", f"250 2.0.0 Ok: queued as {values['event_id']}")
    return Event(**values)


class Redacted:
    """``rows(customer, age, **raw_fields)``: a raw event redacted by ``customers``' policy
    in force, exactly what the sink receives from a redaction worker."""

    def __init__(self, customers: Customers, default: str | None = None) -> None:
        self.customers = customers
        self.default = default  # the customer when none is named
        self.redactor = Redactor(customers)

    def __call__(
        self, customer: str | None = None, age: timedelta = timedelta(0), **fields: Any
    ) -> Event:
        customer = customer or self.default
        assert customer is not None, "name the customer"
        return self.redactor.redact(raw_event(customer, age, **fields))

    def of(self, raw: Event) -> Event:
        return self.redactor.redact(raw)

    def changed(self, customer: str, policy: dict[str, Any], version: int) -> Redacted:
        """These rows with ``customer``'s policy changed to ``policy`` as ``version`` (what a
        worker does on a policies-topic record); this one is left as it is."""
        out = Redacted(self.customers, self.default)
        assert out.redactor.update(customer, Policy.model_validate(policy), version)
        return out

    def hashed(self, customer: str, value: str) -> str:
        """``value`` as the customer's active key stores it (``k1:<hex>``)."""
        c = self.customers.by_id[customer]
        key_id = c.active_key_id
        assert key_id is not None, f"{customer} has no HMAC key"
        return hmac_tagged(key_id, c.keys()[key_id], value)

    def forms(self, customer: str, *values: str) -> list[str]:
        """Every stored form of clear ``values`` (what the API's erase and search match)."""
        return stored_forms(values, self.customers.by_id[customer].keys())
