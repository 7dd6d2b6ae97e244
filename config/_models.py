"""Typed configuration: customers, their domains, retention, keys and redaction policies."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import orjson
import re2
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
    domain_only = "domain_only"
    length_only = "length_only"


# Fields a policy may name: everything but the ones always kept and the version stamp.
POLICY_FIELDS: tuple[str, ...] = tuple(
    f for f in FIELD_NAMES if f not in ALWAYS_KEPT and f != "policy_version"
)
_NUMERIC_FIELDS = frozenset({"size_bytes", "processing_ms"})
_IP_FIELDS = frozenset({"sender_ip"})

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")
_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_BOUNCE_LOCAL_RE = re.compile(r"^[a-z0-9_.-]{1,64}$")


# Fields holding an address (or an id@domain): domain_only applies to them.
_ADDRESS_FIELDS = frozenset({"mail_from", "rcpt_to", "message_id"})
_KEY_ID_RE = r"^[A-Za-z0-9_-]{1,16}$"
# A region's name is part of its topic names, consumer groups and data dirs.
REGION_RE = r"^[a-z][a-z0-9-]{0,15}$"
# The region of customers that name none (and of processes whose MAILMETA_REGION is empty).
DEFAULT_REGION = "default"
# The key id a single hmac_key / hmac_key_env / hmac_key_file gets.
DEFAULT_KEY_ID = "k1"
# A policy's bounds (README): replace rules run on every subject, and every worker holds every
# customer's document. 20,000 rules slowed redaction to ~90 ms an event (issue 21).
MAX_REPLACE_RULES = 100
MAX_POLICY_BYTES = 64 * 1024


def allowed_actions(field: str) -> frozenset[Action]:
    if field in _NUMERIC_FIELDS:
        return frozenset({Action.keep, Action.drop})
    allowed = {Action.keep, Action.drop, Action.hmac, Action.mask}
    if field in _IP_FIELDS:
        allowed.add(Action.truncate_ip)
    if field in _ADDRESS_FIELDS:
        allowed.add(Action.domain_only)
    if field == "subject":
        allowed.add(Action.length_only)
    return frozenset(allowed)


def field_problem(name: str, action: Action) -> str | None:
    """Why ``name: action`` cannot be in a policy, or None: one check for ``actions`` and
    ``rules`` entries alike."""
    if name in ALWAYS_KEPT:
        return f"field {name!r} is always kept and cannot be in a policy"
    if name not in POLICY_FIELDS:
        return f"unknown field {name!r} (expected one of {', '.join(POLICY_FIELDS)})"
    if action not in allowed_actions(name):
        ok = ", ".join(sorted(a.value for a in allowed_actions(name)))
        return f"action {action.value!r} does not apply to field {name!r} ({ok})"
    return None


class Replacement(BaseModel):
    """One regex rule of a subject: every match of ``pattern`` becomes ``with``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    pattern: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    replacement: str = Field(default="[redacted]", alias="with", max_length=200)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        # Patterns run on every subject, so on RE2 (linear time, no backtracking): what it
        # cannot run (back-references, look-around) is refused here, not at the first mail.
        options = re2.Options()
        options.log_errors = False  # the reason goes into the error below, not to stderr
        try:
            re2.compile(value, options)
        except re2.error as exc:
            why = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
            raise ValueError(
                f"not a valid regular expression for the linear-time (RE2) engine: {why}"
            ) from None
        return value


class FieldRule(BaseModel):
    """A field's action with its parameters (the mapping form of a policy entry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Action = Action.keep
    # mask: what replaces the hidden part, and how many leading characters of an
    # address's local part stay visible (text other than addresses is masked whole).
    mask: str | None = Field(default=None, max_length=32)
    keep_chars: int | None = Field(default=None, ge=0, le=8)
    # truncate_ip: the prefix lengths kept.
    ipv4_prefix: int | None = Field(default=None, ge=0, le=32)
    ipv6_prefix: int | None = Field(default=None, ge=0, le=128)
    # subject with action keep: regex replacements applied in order.
    replace: tuple[Replacement, ...] = ()

    @model_validator(mode="after")
    def _params_fit_action(self) -> FieldRule:
        owners = {
            "mask": Action.mask,
            "keep_chars": Action.mask,
            "ipv4_prefix": Action.truncate_ip,
            "ipv6_prefix": Action.truncate_ip,
        }
        for param, owner in owners.items():
            if getattr(self, param) is not None and self.action is not owner:
                raise ValueError(f"{param!r} applies only to action {owner.value!r}")
        if self.replace and self.action is not Action.keep:
            raise ValueError("'replace' applies only to action 'keep'")
        return self

    def document(self) -> str | dict[str, Any]:
        """The YAML/JSON form: the bare action when it has no parameters."""
        doc = self.model_dump(mode="json", exclude_defaults=True, by_alias=True)
        if set(doc) <= {"action"}:
            return self.action.value
        doc["action"] = self.action.value
        return doc


class Policy(BaseModel):
    """field -> action. Fields not named are dropped (fail closed).

    Written as a mapping ``field: action`` or ``field: {action: …, parameters…}``, plus
    optionally ``hmac_key_id`` (which of the customer's keys hashes; default its active one).
    """

    model_config = ConfigDict(frozen=True)

    actions: dict[str, Action]
    # Fields given with parameters (their action is in ``actions`` too).
    rules: dict[str, FieldRule] = Field(default_factory=dict)
    hmac_key_id: Annotated[str, StringConstraints(pattern=_KEY_ID_RE)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _split_rules(cls, data: Any) -> Any:
        # The document form {field: action | {action, params}} -> actions + rules, so
        # ``actions`` keeps meaning field -> Action for every reader.
        if not isinstance(data, dict):
            return data
        if "actions" not in data:
            data = {"actions": data}
        actions = data.get("actions")
        if not isinstance(actions, dict):
            return data
        plain: dict[str, Any] = {}
        rules: dict[str, Any] = dict(data.get("rules") or {})
        key_id = data.get("hmac_key_id")
        for name, value in actions.items():
            if name == "hmac_key_id":
                key_id = value
            elif isinstance(value, dict):
                rules[name] = value
                plain[name] = value.get("action", Action.keep.value)
            else:
                plain[name] = value
        out = {**data, "actions": plain, "rules": rules}
        if key_id is not None:
            out["hmac_key_id"] = key_id
        return out

    @field_validator("actions")
    @classmethod
    def _check(cls, actions: dict[str, Action]) -> dict[str, Action]:
        for name, action in actions.items():
            problem = field_problem(name, action)
            if problem:
                raise ValueError(problem)
        return actions

    @model_validator(mode="after")
    def _rules_fit(self) -> Policy:
        # A rule is an action with parameters: held to every check an actions entry is, and
        # to agree with it (the redactor applies the rule, readers show the action).
        for name, rule in self.rules.items():
            problem = field_problem(name, rule.action)
            if problem:
                raise ValueError(f"field {name!r}: {problem}")
            if name not in self.actions:
                raise ValueError(f"field {name!r}: a rules entry needs its actions entry")
            if self.actions[name] is not rule.action:
                raise ValueError(
                    f"field {name!r}: the rules entry's action {rule.action.value!r} disagrees "
                    f"with the actions entry {self.actions[name].value!r}"
                )
            if rule.replace and name != "subject":
                raise ValueError(f"field {name!r}: 'replace' applies only to 'subject'")
            if len(rule.replace) > MAX_REPLACE_RULES:
                raise ValueError(
                    f"field '{name}.replace': {len(rule.replace)} rules, at most "
                    f"{MAX_REPLACE_RULES}"
                )
        size = len(self.canonical())
        if size > MAX_POLICY_BYTES:
            raise ValueError(
                f"field 'policy': the document is {size} bytes, at most {MAX_POLICY_BYTES}"
            )
        return self

    def action_for(self, name: str) -> Action:
        return self.actions.get(name, Action.drop)

    def rule_for(self, name: str) -> FieldRule:
        """The field's action with its parameters (defaults when given as a bare action)."""
        rule = self.rules.get(name)
        if rule is not None:
            return rule
        return FieldRule(action=self.action_for(name))

    @property
    def uses_hmac(self) -> bool:
        return any(a is Action.hmac for a in self.actions.values()) or any(
            r.action is Action.hmac for r in self.rules.values()
        )

    def document(self) -> dict[str, Any]:
        """The policy as written in a customer's ``policy:`` block (round-trips)."""
        doc: dict[str, Any] = {
            name: self.rule_for(name).document() for name in POLICY_FIELDS if name in self.actions
        }
        if self.hmac_key_id is not None:
            doc["hmac_key_id"] = self.hmac_key_id
        return doc

    def canonical(self) -> bytes:
        """The document as JSON with sorted keys: what :meth:`digest` hashes and the size bound
        measures."""
        return orjson.dumps(self.document(), option=orjson.OPT_SORT_KEYS)

    def digest(self) -> str:
        """SHA-256 (hex) of the canonical document: what a version number stands for, so two
        documents published under one number are told apart."""
        return hashlib.sha256(self.canonical()).hexdigest()


# The policy a customer gets when its config names none: only the always-kept fields.
STRICT_DEFAULT_POLICY = Policy(actions={})


def parse_host_port(value: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError names what is wrong."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host, int(port)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str, setting: str) -> list[IPNetwork]:
    """Comma-separated CIDRs; a bad one is an error that names the setting and the entry."""
    nets: list[IPNetwork] = []
    for item in (n.strip() for n in text.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{setting}: {item!r} is not a network (CIDR)") from None
    return nets


class SmtpUser(BaseModel):
    """An SMTP AUTH login of a customer (outbound relaying). Only a password *hash* is
    stored: an argon2 hash as written by ``mailmeta.ingest.hash_password``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: Annotated[str, StringConstraints(min_length=1, max_length=255)]
    password_hash: str = Field(repr=False)

    @field_validator("password_hash")
    @classmethod
    def _hashed(cls, value: str) -> str:
        if not value.startswith("$argon2"):
            raise ValueError("must be an argon2 hash ($argon2id$...), never a clear-text password")
        return value


class HmacKey(BaseModel):
    """One HMAC key of a customer: its id and exactly one place the secret lives."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, StringConstraints(pattern=_KEY_ID_RE)]
    key: str | None = Field(default=None, min_length=16, repr=False)
    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> HmacKey:
        given = [k for k in ("key", "env", "file") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"key {self.id!r}: give exactly one of key, env, file")
        return self

    def resolve(self, customer: str) -> bytes:
        if self.key:
            return self.key.encode()
        if self.env:
            value = os.environ.get(self.env)
            if not value:
                raise ValueError(f"customer {customer!r}: env var {self.env} is not set")
            return value.encode()
        assert self.file is not None
        value_b = self.file.read_bytes().strip()
        if len(value_b) < 16:
            raise ValueError(f"customer {customer!r}: key file {self.file} holds < 16 bytes")
        return value_b


class Customer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, StringConstraints(pattern=_ID_RE)]
    domains: list[str] = Field(min_length=1)
    retention_days: int = Field(ge=1, le=3650)
    hmac_key: str | None = Field(default=None, min_length=16, repr=False)
    hmac_key_env: str | None = None
    hmac_key_file: Path | None = None
    # Key rotation: several keys by id; hashes carry the id that made them ("k2:hex").
    # hmac_active_key picks the one new events use (default: the last listed). The single
    # hmac_key / _env / _file above is the key "k1".
    hmac_keys: list[HmacKey] = Field(default_factory=list)
    hmac_active_key: Annotated[str, StringConstraints(pattern=_KEY_ID_RE)] | None = None
    policy: Policy = STRICT_DEFAULT_POLICY
    policy_version: int = Field(default=1, ge=1)
    # SMTP front end (all optional): where this customer's mail is relayed ("HOST:PORT";
    # unset: the global MAILMETA_RELAY_TO, or none: a terminal sink), the client networks
    # and AUTH logins that may relay through mailmeta for it, and whether its mail must
    # arrive over TLS.
    relay_to: str | None = None
    client_networks: list[str] = Field(default_factory=list)
    smtp_users: list[SmtpUser] = Field(default_factory=list)
    require_tls: bool = False
    # Where this customer's delivery status notifications arrive (ingest/_dsn.py): whole
    # addresses (also with a VERP "+token" after the local part) and domains all of whose
    # addresses are bounce addresses.
    bounce_addresses: list[str] = Field(default_factory=list)
    bounce_domains: list[str] = Field(default_factory=list)
    # Region pinning: this customer's events travel only through that region's topics and
    # land only in its store; every other region's front end, workers, sinks and API refuse
    # them. Must be declared under the file's top-level `regions`. Unset: the default region.
    region: Annotated[str, StringConstraints(pattern=REGION_RE)] = DEFAULT_REGION

    @field_validator("relay_to")
    @classmethod
    def _relay_to(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value)
        return value

    @field_validator("client_networks")
    @classmethod
    def _networks(cls, nets: list[str]) -> list[str]:
        out = []
        for n in nets:
            try:
                out.append(str(ipaddress.ip_network(n.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{n!r} is not an IP network (CIDR)") from None
        return out

    @field_validator("domains", "bounce_domains")
    @classmethod
    def _domains(cls, domains: list[str]) -> list[str]:
        out = []
        for d in domains:
            d = d.strip().lower().rstrip(".")
            if not _DOMAIN_RE.match(d):
                raise ValueError(f"{d!r} is not a valid domain name")
            out.append(d)
        return out

    @field_validator("bounce_addresses")
    @classmethod
    def _bounce_addresses(cls, addresses: list[str]) -> list[str]:
        out = []
        for a in addresses:
            local, at, domain = a.strip().lower().rpartition("@")
            domain = domain.rstrip(".")
            # "+" separates the VERP token, so a bounce address's own local part has none.
            if not at or not _BOUNCE_LOCAL_RE.match(local) or not _DOMAIN_RE.match(domain):
                raise ValueError(
                    f"{a!r} is not an address local@domain (local part: letters, digits, "
                    "'.', '_', '-'; no '+', which starts a VERP token)"
                )
            out.append(f"{local}@{domain}")
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
        if given and self.hmac_keys:
            raise ValueError(f"give either hmac_keys or {given[0]}, not both")
        ids = [k.id for k in self.hmac_keys]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"hmac key id {sorted(dup)[0]!r} appears twice")
        if self.hmac_active_key is not None and self.hmac_active_key not in self.key_ids():
            raise ValueError(f"hmac_active_key {self.hmac_active_key!r} is not one of the keys")
        problem = self.policy_problem(self.policy)
        if problem:
            raise ValueError(problem)
        return self

    def key_ids(self) -> list[str]:
        if self.hmac_keys:
            return [k.id for k in self.hmac_keys]
        if self.hmac_key or self.hmac_key_env or self.hmac_key_file:
            return [DEFAULT_KEY_ID]
        return []

    @property
    def active_key_id(self) -> str | None:
        ids = self.key_ids()
        return self.hmac_active_key or (ids[-1] if ids else None)

    def policy_problem(self, policy: Policy) -> str | None:
        """Why ``policy`` cannot apply to this customer (keys), or None."""
        if policy.hmac_key_id is not None and policy.hmac_key_id not in self.key_ids():
            return (
                f"field 'hmac_key_id': key {policy.hmac_key_id!r} is not configured for "
                f"customer {self.id!r} (has: {', '.join(self.key_ids()) or 'none'})"
            )
        if policy.uses_hmac and not self.key_ids():
            field = next(n for n in POLICY_FIELDS if policy.rule_for(n).action is Action.hmac)
            return (
                f"field {field!r}: policy uses 'hmac' but no hmac_key / hmac_key_env / "
                "hmac_key_file / hmac_keys"
            )
        return None

    def keys(self) -> dict[str, bytes]:
        """Every configured key by id, resolved from where the config says it lives."""
        if self.hmac_keys:
            return {k.id: k.resolve(self.id) for k in self.hmac_keys}
        if not self.key_ids():
            return {}
        single = HmacKey(
            id=DEFAULT_KEY_ID, key=self.hmac_key, env=self.hmac_key_env, file=self.hmac_key_file
        )
        return {DEFAULT_KEY_ID: single.resolve(self.id)}

    def key_bytes(self) -> bytes:
        """The customer's active HMAC key."""
        key_id = self.active_key_id
        if key_id is None:
            raise ValueError(f"customer {self.id!r} has no hmac key")
        return self.keys()[key_id]


class Region(BaseModel):
    """A region: its own Kafka topics, store and API (a "cell"). The addresses are what other
    regions tell clients who asked the wrong one; `default` may be declared for them too."""

    model_config = ConfigDict(extra="forbid")

    api_url: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")] | None = None
    smtp_host: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.:\[\]-]{1,255}$")] | None = (
        None
    )


class CustomersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    regions: dict[Annotated[str, StringConstraints(pattern=REGION_RE)], Region] = Field(
        default_factory=dict
    )
    customers: list[Customer] = Field(min_length=1)

    @model_validator(mode="after")
    def _regions(self) -> CustomersFile:
        for c in self.customers:
            if c.region != DEFAULT_REGION and c.region not in self.regions:
                declared = ", ".join(sorted(self.regions)) or "none"
                raise ValueError(
                    f"customer {c.id!r}: field 'region': {c.region!r} is not declared under "
                    f"'regions' (declared: {declared})"
                )
        return self

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
        # Bounce domains and addresses: no customer's mail may land with another one.
        for c in self.customers:
            for d in c.bounce_domains:
                if owner.get(d, c.id) != c.id:
                    raise ValueError(
                        f"bounce domain {d!r} of customer {c.id!r} already belongs to {owner[d]!r}"
                    )
                owner[d] = c.id
        bounce_owner: dict[str, str] = {}
        for c in self.customers:
            for a in c.bounce_addresses:
                domain = a.rpartition("@")[2]
                if owner.get(domain, c.id) != c.id:
                    raise ValueError(
                        f"bounce address {a!r} of customer {c.id!r} is at a domain of "
                        f"{owner[domain]!r}"
                    )
                if bounce_owner.get(a, c.id) != c.id:
                    raise ValueError(
                        f"bounce address {a!r} belongs to both customer {bounce_owner[a]!r} "
                        f"and {c.id!r}"
                    )
                bounce_owner[a] = c.id
        users: dict[str, str] = {}
        for c in self.customers:
            for u in c.smtp_users:
                if u.username in users:
                    raise ValueError(
                        f"smtp user {u.username!r} belongs to both customer "
                        f"{users[u.username]!r} and {c.id!r}"
                    )
                users[u.username] = c.id
        return self
