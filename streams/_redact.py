"""Redaction actions and the per-customer redactor. Pure functions: no I/O."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from mailmeta.config import Action, Customers, Policy
from mailmeta.config._models import POLICY_FIELDS
from mailmeta.schema import Event

V4_PREFIX = 24
V6_PREFIX = 48


class RedactionError(ValueError):
    """The event cannot be redacted (unknown customer …); it goes to the dead-letter topic."""


def hmac_hex(key: bytes, value: str) -> str:
    return hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()


def mask(value: str) -> str:
    """``jane@example.com`` -> ``j***@example.com``; anything else -> ``***``."""
    local, at, domain = value.rpartition("@")
    if at and local and domain:
        # A quoted local part may start with '"': keep one visible character all the same.
        return f"{local[0]}***@{domain}"
    return "***"


def truncate_ip(value: str, v4_prefix: int = V4_PREFIX, v6_prefix: int = V6_PREFIX) -> str | None:
    """The network the address is in, as CIDR text; None when it is not an IP address."""
    try:
        ip = ipaddress.ip_address(value.strip().strip("[]").removeprefix("IPv6:"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def _scalar(action: Action, key: bytes) -> Callable[[str], str | None]:
    if action is Action.keep:
        return lambda v: v
    if action is Action.hmac:
        return lambda v: hmac_hex(key, v)
    if action is Action.mask:
        return mask
    if action is Action.truncate_ip:
        return truncate_ip
    return lambda v: None


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A customer's policy turned into one function per field (fail closed)."""

    version: int
    steps: tuple[tuple[str, Action, Callable[[str], str | None]], ...]

    @classmethod
    def compile(cls, policy: Policy, key: bytes | None, version: int) -> CompiledPolicy:
        steps = []
        for name in POLICY_FIELDS:
            action = policy.action_for(name)
            if action is Action.drop:
                continue
            if action is Action.hmac and not key:
                raise ValueError("hmac needs a key")
            steps.append((name, action, _scalar(action, key or b"")))
        return cls(version, tuple(steps))

    def apply(self, event: Event) -> Event:
        out = Event(
            event_id=event.event_id,
            received_at=event.received_at,
            customer_id=event.customer_id,
            status=event.status,
            policy_version=self.version,
        )
        for name, action, fn in self.steps:
            value = getattr(event, name)
            if value is None:
                continue
            if action is Action.keep:
                setattr(out, name, value)
            elif isinstance(value, list):
                setattr(out, name, [r for r in map(fn, value) if r is not None])
            elif isinstance(value, str):
                setattr(out, name, fn(value))
        return out


class Redactor:
    """Redacts events by their customer's policy; unknown customers are an error."""

    def __init__(self, customers: Customers) -> None:
        self._compiled = {
            c.id: CompiledPolicy.compile(
                c.policy, c.key_bytes() if _uses_key(c.policy) else None, c.policy_version
            )
            for c in customers
        }

    def redact(self, event: Event) -> Event:
        compiled = self._compiled.get(event.customer_id)
        if compiled is None:
            raise RedactionError(f"no policy for customer {event.customer_id!r}")
        return compiled.apply(event)


def _uses_key(policy: Policy) -> bool:
    return any(a is Action.hmac for a in policy.actions.values())
