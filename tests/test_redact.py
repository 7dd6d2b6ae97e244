"""Redaction actions on each field type, and fail-closed policies (pure, no I/O)."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from mailmeta.config import Action, Policy, parse_customers
from mailmeta.policy import (
    CompiledPolicy,
    PolicyConflict,
    RedactionError,
    Redactor,
    mask,
    truncate_ip,
)
from mailmeta.schema import Event, new_event_id, now_ms

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
    # Hashes carry the id of the key that made them ("k1" for a single key).
    assert out.mail_from == "k1:" + hmac.new(KEY, ev.mail_from.encode(), hashlib.sha256).hexdigest()  # type: ignore[union-attr]
    assert (
        out.message_id == "k1:" + hmac.new(KEY, ev.message_id.encode(), hashlib.sha256).hexdigest()
    )  # type: ignore[union-attr]
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


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"mail_from": None, "rcpt_to": None, "sender_ip": "2001:db8::1"},
        {"sender_ip": "010.1.2.3", "rcpt_to": [], "policy_version": 3},
    ],
)
def test_apply_dict_is_apply(kw: dict[str, object]) -> None:
    """The worker's hot path (dict in, dict out) gives what apply() gives, field order too."""
    policy = Policy(
        actions={
            "mail_from": Action.hmac,
            "rcpt_to": Action.mask,
            "sender_ip": Action.truncate_ip,
            "helo": Action.hmac,
            "message_id": Action.hmac,
            "size_bytes": Action.keep,
        }
    )
    compiled = CompiledPolicy.compile(policy, KEY, version=4)
    ev = _event(**kw)
    out = compiled.apply_dict(ev.to_dict())
    assert list(out.items()) == list(compiled.apply(ev).to_dict().items())


@pytest.mark.parametrize(
    ("value", "prefix", "expected"),
    [
        ("10.20.30.40", 16, "10.20.0.0/16"),
        ("10.20.30.40", 32, "10.20.30.40/32"),
        ("255.255.255.255", 24, "255.255.255.0/24"),
        ("01.2.3.4", 24, None),  # leading zero: not an address for ipaddress either
        ("256.2.3.4", 24, None),
        (" 10.20.30.40 ", 24, "10.20.30.0/24"),
    ],
)
def test_truncate_ipv4_fast_path(value: str, prefix: int, expected: str | None) -> None:
    assert truncate_ip(value, prefix) == expected


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


@pytest.mark.parametrize(
    ("field", "rule", "value", "expected"),
    [
        ("mail_from", "domain_only", "Jane.Doe+tag@Sender.EXAMPLE", "sender.example"),
        (
            "rcpt_to",
            "domain_only",
            ['"odd local"@demo.example', "x@b.example"],
            ["demo.example", "b.example"],
        ),
        ("message_id", "domain_only", "<abc.123@mx.sender.example>", "mx.sender.example"),
        ("mail_from", "domain_only", "no-at-sign", None),
        ("subject", "length_only", "Grüße – 東京", "10"),
        (
            "subject",
            {"action": "keep", "replace": [{"pattern": r"\b\d{6,}\b", "with": "#"}]},
            "=?utf-8?q?x?= order 1234567 and 42",
            "=?utf-8?q?x?= order # and 42",
        ),
        ("subject", {"action": "keep", "replace": [{"pattern": "(a)", "with": r"\1"}]}, "a", r"\1"),
        (
            "rcpt_to",
            {"action": "mask", "mask": "•", "keep_chars": 2},
            ["jane@x.example"],
            ["ja•@x.example"],
        ),
        ("helo", {"action": "mask", "mask": "[hidden]"}, "mx.example", "[hidden]"),
        (
            "sender_ip",
            {"action": "truncate_ip", "ipv4_prefix": 16, "ipv6_prefix": 32},
            "203.0.113.77",
            "203.0.0.0/16",
        ),
        (
            "sender_ip",
            {"action": "truncate_ip", "ipv6_prefix": 32},
            "2001:db8:1234::1",
            "2001:db8::/32",
        ),
        ("sender_ip", "truncate_ip", "IPv6:2001:db8::1", "2001:db8::/48"),
        (
            "sender_ip",
            "hmac",
            "203.0.113.77",
            "k1:" + hmac.new(KEY, b"203.0.113.77", hashlib.sha256).hexdigest(),
        ),
        ("tls_version", "keep", None, None),
    ],
)
def test_actions_with_parameters(field: str, rule: object, value: object, expected: object) -> None:
    policy = Policy.model_validate({field: rule})
    out = CompiledPolicy.compile(policy, KEY, 3).apply(_event(**{field: value}))
    assert getattr(out, field) == expected


def test_key_rotation_records_the_key_id() -> None:
    customers = parse_customers(
        {"customers": [{
            "id": "demo", "domains": ["demo.example"], "retention_days": 30,
            "hmac_keys": [{"id": "k1", "key": "a" * 16}, {"id": "k2", "key": "b" * 16}],
            "policy": {"mail_from": "hmac"},
        }]},
        "t",
    )  # fmt: skip
    c = customers.by_id["demo"]
    assert c.active_key_id == "k2"  # default: the last listed
    r = Redactor(customers)
    out = r.redact(_event())
    assert (
        out.mail_from
        == "k2:" + hmac.new(b"b" * 16, b"Jane.Doe+tag@sender.example", "sha256").hexdigest()
    )
    # A live policy may pin an older key; a key this process lacks fails closed.
    assert r.update("demo", Policy.model_validate({"mail_from": "hmac", "hmac_key_id": "k1"}), 2)
    assert str(r.redact(_event()).mail_from).startswith("k1:")
    assert r.update("demo", Policy.model_validate({"mail_from": "hmac", "hmac_key_id": "k7"}), 3)
    with pytest.raises(RedactionError, match="policy v3 of customer 'demo' cannot apply"):
        r.redact(_event())
    # An older version never replaces a newer one; one it knows with another document is a
    # conflict (issue 21), and what is in force stays.
    v2 = Policy.model_validate({"mail_from": "hmac", "hmac_key_id": "k1"})
    assert not r.update("demo", v2, 2)
    with pytest.raises(PolicyConflict, match="v2 of 'demo'"):
        r.update("demo", Policy.model_validate({"mail_from": "keep"}), 2)
    assert r.version_of("demo") == 3


@pytest.mark.parametrize(
    ("customer", "message"),
    [
        (
            {"hmac_key": "x" * 16, "hmac_keys": [{"id": "k1", "key": "y" * 16}]},
            "either hmac_keys or",
        ),
        ({"hmac_keys": [{"id": "k1", "key": "y" * 16}, {"id": "k1", "env": "X"}]}, "appears twice"),
        ({"hmac_keys": [{"id": "k1"}]}, "exactly one of key, env, file"),
        (
            {"hmac_keys": [{"id": "k1", "key": "y" * 16}], "hmac_active_key": "k2"},
            "not one of the keys",
        ),
        (
            {"policy": {"subject": {"action": "mask", "replace": [{"pattern": "a"}]}}},
            "'replace' applies only to action 'keep'",
        ),
        (
            {"policy": {"subject": {"action": "keep", "replace": [{"pattern": "("}]}}},
            "not a valid regular expression",
        ),
        (
            {"policy": {"helo": {"action": "keep", "ipv4_prefix": 8}}},
            "'ipv4_prefix' applies only to action 'truncate_ip'",
        ),
        (
            {"policy": {"helo": "length_only"}},
            "action 'length_only' does not apply to field 'helo'",
        ),
        ({"policy": {"sender_ip": "domain_only"}}, "action 'domain_only' does not apply"),
    ],
)
def test_invalid_keys_and_rules_name_the_problem(customer: dict[str, object], message: str) -> None:
    from mailmeta.config import ConfigError

    data = {"customers": [{"id": "a", "domains": ["a.example"], "retention_days": 3, **customer}]}
    with pytest.raises(ConfigError) as info:
        parse_customers(data, "customers.yaml")
    assert message in str(info.value) and "customer 'a'" in str(info.value)


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"body": "smuggled"},
        {"event_id": ""},
        {"status": 3},
        {"received_at": "yesterday"},
        {"received_at": "2026-01-02T03:04:05+02:00"},
        {"helo": 5},
        {"rcpt_to": "a@b"},
        {"rcpt_to": ["a@b", 1]},
        {"size_bytes": True},
        {"size_bytes": 1.5},
        {"processing_ms": False},
        {"processing_ms": 2},
        {"policy_version": "1"},
        {"subject": None, "date": None},
    ],
)
def test_worker_fast_check_never_looser_than_schema(change: dict[str, object]) -> None:
    """The worker's fast validity check accepts only what schema.event_from_dict accepts."""
    from mailmeta.schema import SchemaError, event_from_dict, plainly_valid

    obj = {**_event().to_dict(), **change}
    try:
        event_from_dict(dict(obj))
        valid = True
    except SchemaError:
        valid = False
    assert plainly_valid(obj) == valid


@pytest.mark.timeout(30)  # Python's re takes ~forever here: fail, do not hang
def test_subject_replacements_run_in_linear_time() -> None:
    """Admin regexes run on every subject: a catastrophic-backtracking pattern must not
    stall the worker (issue 14.14)."""
    policy = Policy.model_validate(
        {"subject": {"action": "keep", "replace": [{"pattern": "(a+)+$", "with": "#"}]}}
    )
    redact = CompiledPolicy.compile(policy, None, 1)
    subject = "a" * 50_000 + "!"  # Python's re backtracks for ~forever on this
    ev = Event(
        event_id=new_event_id(), received_at=now_ms(), customer_id="c", status="accepted",
        subject=subject,
    )  # fmt: skip
    t0 = time.perf_counter()
    assert redact.apply(ev).subject == subject  # no match, as `re` would (eventually) say
    ok = Event(**{**ev.to_dict(), "subject": "a" * 50_000})
    assert redact.apply(ok).subject == "#"
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    ("pattern", "why"),
    [(r"(a)\1", "invalid escape sequence"), (r"(?<=a)b", "invalid perl operator")],
)
def test_patterns_re2_cannot_run_are_refused_naming_the_field(pattern: str, why: str) -> None:
    from mailmeta.config import ConfigError

    rules = {"subject": {"action": "keep", "replace": [{"pattern": "ok"}, {"pattern": pattern}]}}
    data = {"customers": [{"id": "a", "domains": ["a.example"], "retention_days": 3,
                           "policy": rules}]}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_customers(data, "customers.yaml")
    text = str(info.value)
    assert "customer 'a'" in text and "policy.subject.replace.1.pattern" in text, text
    assert why in text and "linear-time" in text, text
