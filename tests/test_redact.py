"""Redaction actions on each field type, and fail-closed policies (pure, no I/O)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from mailmeta.config import Action, Policy
from mailmeta.config._load import parse_customers
from mailmeta.schema import Event, new_event_id, now_ms
from mailmeta.streams import CompiledPolicy, RedactionError, Redactor, mask, truncate_ip

KEY = b"k" * 32


def _event(**kw: object) -> Event:
    base: dict[str, object] = dict(
        event_id=new_event_id(),
        received_at=now_ms(),
        customer_id="demo",
        status="accepted",
        sender_ip="203.0.113.77",
        helo="mx.sender.example",
        mail_from="Jane.Doe+tag@sender.example",
        rcpt_to=["bob@demo.example", '"odd local"@demo.example'],
        message_id="<abc@sender.example>",
        subject="Quarterly report",
        size_bytes=1234,
        tls_version="TLSv1.3",
    )
    base.update(kw)
    return Event(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("203.0.113.77", "203.0.113.0/24"),
        ("2001:db8:1234:5678::1", "2001:db8:1234::/48"),
        ("::ffff:198.51.100.9", "198.51.100.0/24"),
        ("[2001:db8::1]", "2001:db8::/48"),
        ("not-an-ip", None),
    ],
)
def test_truncate_ip(value: str, expected: str | None) -> None:
    assert truncate_ip(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("jane@example.com", "j***@example.com"),
        ('"odd local"@demo.example', '"***@demo.example'),
        ("user+tag@sub.example.org", "u***@sub.example.org"),
        ("no-at-sign", "***"),
        ("@example.com", "***"),
    ],
)
def test_mask(value: str, expected: str) -> None:
    assert mask(value) == expected


def test_every_action_on_every_field_type() -> None:
    policy = Policy(
        actions={
            "mail_from": Action.hmac,
            "rcpt_to": Action.mask,
            "sender_ip": Action.truncate_ip,
            "subject": Action.keep,
            "message_id": Action.hmac,
            "size_bytes": Action.keep,
        }
    )
    ev = _event()
    out = CompiledPolicy.compile(policy, KEY, version=7).apply(ev)
    assert out.mail_from == hmac.new(KEY, ev.mail_from.encode(), hashlib.sha256).hexdigest()  # type: ignore[union-attr]
    assert out.message_id == hmac.new(KEY, ev.message_id.encode(), hashlib.sha256).hexdigest()  # type: ignore[union-attr]
    assert out.rcpt_to == ["b***@demo.example", '"***@demo.example']
    assert out.sender_ip == "203.0.113.0/24"
    assert out.subject == "Quarterly report"
    assert out.size_bytes == 1234
    assert out.policy_version == 7
    # Not named -> dropped (fail closed); the always-kept fields survive.
    assert out.helo is None and out.tls_version is None
    assert (out.event_id, out.received_at, out.customer_id, out.status) == (
        ev.event_id,
        ev.received_at,
        ev.customer_id,
        ev.status,
    )


def test_missing_fields_stay_missing() -> None:
    policy = Policy(actions={"mail_from": Action.hmac, "subject": Action.mask})
    out = CompiledPolicy.compile(policy, KEY, 1).apply(_event(mail_from=None, subject=None))
    assert out.mail_from is None and out.subject is None


def test_rfc2047_decoded_subject_is_kept_verbatim() -> None:
    policy = Policy(actions={"subject": Action.keep})
    out = CompiledPolicy.compile(policy, KEY, 1).apply(_event(subject="Grüße – 東京"))
    assert out.subject == "Grüße – 東京"


def test_unknown_customer_is_an_error() -> None:
    customers = parse_customers(
        {"customers": [{"id": "a", "domains": ["a.example"], "retention_days": 30}]}, "t"
    )
    with pytest.raises(RedactionError, match="no policy for customer 'zzz'"):
        Redactor(customers).redact(_event(customer_id="zzz"))


def test_customer_without_policy_gets_strict_default() -> None:
    customers = parse_customers(
        {"customers": [{"id": "demo", "domains": ["demo.example"], "retention_days": 30}]}, "t"
    )
    out = Redactor(customers).redact(_event())
    assert (
        out.to_dict() | {"policy_version": None}
        == Event(
            event_id=out.event_id,
            received_at=out.received_at,
            customer_id="demo",
            status="accepted",
        ).to_dict()
    )


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"helo": "dropp"}, "customer 'a': field 'policy.helo': Input should be"),
        ({"size_bytes": "hmac"}, "action 'hmac' does not apply to field 'size_bytes'"),
        ({"subject": "truncate_ip"}, "action 'truncate_ip' does not apply to field 'subject'"),
        ({"body": "keep"}, "unknown field 'body'"),
        ({"event_id": "drop"}, "always kept"),
        ({"mail_from": "hmac"}, "no hmac_key"),
    ],
)
def test_invalid_policies_are_refused_naming_the_field(
    policy: dict[str, str], message: str
) -> None:
    from mailmeta.config import ConfigError

    data = {
        "customers": [{"id": "a", "domains": ["a.example"], "retention_days": 3, "policy": policy}]
    }
    with pytest.raises(ConfigError, match=r"customers\.yaml") as info:
        parse_customers(data, "customers.yaml")
    assert message in str(info.value)
