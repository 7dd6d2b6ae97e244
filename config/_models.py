"""Typed configuration: customers, their domains, retention, keys and redaction policies."""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from mailmeta.schema import ALWAYS_KEPT, FIELD_NAMES


class Action(StrEnum):
    keep = "keep"
    drop = "drop"
    hmac = "hmac"
    mask = "mask"
    truncate_ip = "truncate_ip"


# Fields a policy may name: everything but the ones always kept and the version stamp.
POLICY_FIELDS: tuple[str, ...] = tuple(
    f for f in FIELD_NAMES if f not in ALWAYS_KEPT and f != "policy_version"
)
_NUMERIC_FIELDS = frozenset({"size_bytes", "processing_ms"})
_IP_FIELDS = frozenset({"sender_ip"})

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")
_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def allowed_actions(field: str) -> frozenset[Action]:
    if field in _NUMERIC_FIELDS:
        return frozenset({Action.keep, Action.drop})
    allowed = {Action.keep, Action.drop, Action.hmac, Action.mask}
    if field in _IP_FIELDS:
        allowed.add(Action.truncate_ip)
    return frozenset(allowed)


class Policy(BaseModel):
    """field -> action. Fields not named are dropped (fail closed)."""

    model_config = ConfigDict(frozen=True)

    actions: dict[str, Action]

    @field_validator("actions")
    @classmethod
    def _check(cls, actions: dict[str, Action]) -> dict[str, Action]:
        for name, action in actions.items():
            if name in ALWAYS_KEPT:
                raise ValueError(f"field {name!r} is always kept and cannot be in a policy")
            if name not in POLICY_FIELDS:
                raise ValueError(
                    f"unknown field {name!r} (expected one of {', '.join(POLICY_FIELDS)})"
                )
            if action not in allowed_actions(name):
                ok = ", ".join(sorted(a.value for a in allowed_actions(name)))
                raise ValueError(f"action {action.value!r} does not apply to field {name!r} ({ok})")
        return actions

    def action_for(self, name: str) -> Action:
        return self.actions.get(name, Action.drop)


# The policy a customer gets when its config names none: only the always-kept fields.
STRICT_DEFAULT_POLICY = Policy(actions={})


class Customer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, StringConstraints(pattern=_ID_RE)]
    domains: list[str] = Field(min_length=1)
    retention_days: int = Field(ge=1, le=3650)
    hmac_key: str | None = Field(default=None, min_length=16, repr=False)
    hmac_key_env: str | None = None
    hmac_key_file: Path | None = None
    policy: Policy = STRICT_DEFAULT_POLICY
    policy_version: int = Field(default=1, ge=1)

    @field_validator("domains")
    @classmethod
    def _domains(cls, domains: list[str]) -> list[str]:
        out = []
        for d in domains:
            d = d.strip().lower().rstrip(".")
            if not _DOMAIN_RE.match(d):
                raise ValueError(f"{d!r} is not a valid domain name")
            out.append(d)
        return out

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value: object) -> object:
        if value is None:
            return STRICT_DEFAULT_POLICY
        if isinstance(value, dict) and "actions" not in value:
            return {"actions": value}
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> Customer:
        given = [k for k in ("hmac_key", "hmac_key_env", "hmac_key_file") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(
                f"give only one of hmac_key, hmac_key_env, hmac_key_file (got {given})"
            )
        needs_key = any(a is Action.hmac for a in self.policy.actions.values())
        if needs_key and not given:
            raise ValueError("policy uses 'hmac' but no hmac_key / hmac_key_env / hmac_key_file")
        return self

    def key_bytes(self) -> bytes:
        """The customer's HMAC key, resolved from where the config says it lives."""
        if self.hmac_key:
            return self.hmac_key.encode()
        if self.hmac_key_env:
            value = os.environ.get(self.hmac_key_env)
            if not value:
                raise ValueError(f"customer {self.id!r}: env var {self.hmac_key_env} is not set")
            return value.encode()
        if self.hmac_key_file:
            return self.hmac_key_file.read_bytes().strip()
        raise ValueError(f"customer {self.id!r} has no hmac key")


class CustomersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customers: list[Customer] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> CustomersFile:
        seen_ids: set[str] = set()
        owner: dict[str, str] = {}
        for c in self.customers:
            if c.id in seen_ids:
                raise ValueError(f"customer id {c.id!r} appears twice")
            seen_ids.add(c.id)
            for d in c.domains:
                if d in owner:
                    raise ValueError(
                        f"domain {d!r} belongs to both customer {owner[d]!r} and {c.id!r}"
                    )
                owner[d] = c.id
        return self
