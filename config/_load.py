"""Loading the customers file, with errors that name the file, the customer and the field."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mailmeta.config._models import DEFAULT_REGION, Customer, CustomersFile, Region

# Customers and policy files are small (the example is ~2 KB); a bound keeps a wrong path
# (a log, a device) from being read whole.
MAX_INPUT_BYTES = 1 << 20


class ConfigError(ValueError):
    """The configuration is invalid; the message names file, customer and field."""


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases (``&a``, ``*a``, ``<<: *a``): no input of
    mailmeta needs them, and a few aliases nested can expand a 1 KB file into gigabytes
    ("billion laughs"). Refused at the first one, before anything is expanded."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (& and *) are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)


def load_yaml(path: str | Path) -> Any:
    """The YAML document of an input file (customers, policy), or a one-line ConfigError
    naming the file: unreadable, over MAX_INPUT_BYTES, not UTF-8, not YAML, or using
    anchors/aliases."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_INPUT_BYTES:
        raise ConfigError(f"{path}: larger than the limit of {MAX_INPUT_BYTES} bytes (1 MiB)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader, minus aliases
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML: {exc.problem}{where}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None


@dataclass(frozen=True, slots=True)
class Elsewhere:
    """Where a customer pinned to another region than the one asking (``here``) is served,
    with the addresses that region declares: what every stage refuses such a customer with
    (ingest 450 at RCPT, workers and sinks a dead letter, the API 421)."""

    customer_id: str
    region: str
    here: str
    api_url: str | None = None
    smtp_host: str | None = None

    def where(self) -> str:
        """How a client reaches the serving region: its API URL / SMTP host when declared."""
        hints = [h for h in (self.api_url, self.smtp_host) if h]
        return f"region {self.region!r}" + (f" ({', '.join(hints)})" if hints else "")

    def reason(self) -> str:
        """Why a record of this customer is dead-lettered here (worker and sink)."""
        return (
            f"customer {self.customer_id!r} is served in region {self.region!r}, "
            f"not in {self.here!r}"
        )


class Customers:
    """The validated customers, indexed by id and by recipient domain, as seen from the region
    a process serves (``region``): every stage knows every customer, to tell a misdirected
    client where to go, and handles only the customers of its own region."""

    def __init__(
        self,
        customers: list[Customer],
        source: str = "<memory>",
        regions: dict[str, Region] | None = None,
        region: str = DEFAULT_REGION,
    ) -> None:
        self.source = source
        self.regions: dict[str, Region] = dict(regions or {})
        self.region = region
        self.by_id: dict[str, Customer] = {c.id: c for c in customers}
        self._by_domain: dict[str, Customer] = {d: c for c in customers for d in c.domains}
        self._elsewhere: dict[str, Elsewhere] = {}
        for c in customers:
            if c.region != region:
                r = self.regions.get(c.region)
                api_url, smtp_host = (r.api_url, r.smtp_host) if r is not None else (None, None)
                self._elsewhere[c.id] = Elsewhere(c.id, c.region, region, api_url, smtp_host)

    def serving(self, region: str) -> Customers:
        """The same customers as seen by a process of ``region`` (MAILMETA_REGION)."""
        if region != DEFAULT_REGION and region not in self.regions:
            declared = ", ".join(sorted(self.regions)) or "none"
            raise ConfigError(
                f"MAILMETA_REGION={region!r} is not a region of {self.source} (declared: {declared})"
            )
        return Customers(list(self.by_id.values()), self.source, self.regions, region)

    def served_elsewhere(self, customer_id: str) -> Elsewhere | None:
        """Where the customer ``customer_id`` is served when it is pinned to another region;
        None when this region serves it (or no customer has that id: not this file's to
        judge). The one region check of every stage."""
        return self._elsewhere.get(customer_id)

    def here(self) -> list[Customer]:
        """The customers of this region: the only ones whose data this process may handle."""
        return [c for c in self.by_id.values() if c.region == self.region]

    def regional(self) -> Customers:
        """Only this region's customers, as seen from it (what a redactor may hold, what
        listings show and what the store may hold)."""
        return Customers(self.here(), self.source, self.regions, self.region)

    def region_names(self) -> list[str]:
        """Every region of the file: the default one first, then the declared ones by name."""
        return [DEFAULT_REGION, *sorted(r for r in self.regions if r != DEFAULT_REGION)]

    def __iter__(self) -> Iterator[Customer]:
        return iter(self.by_id.values())

    def __len__(self) -> int:
        return len(self.by_id)

    def for_domain(self, domain: str) -> Customer | None:
        return self._by_domain.get(domain.lower().rstrip("."))

    def for_address(self, address: str) -> Customer | None:
        _, at, domain = address.rpartition("@")
        return self.for_domain(domain) if at else None

    @property
    def shortest_retention_days(self) -> int:
        """Of this region's customers (all of them if it has none): its topics' retention."""
        return min(c.retention_days for c in (self.here() or self.by_id.values()))


def _where(data: Any, loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic error location into 'customer 'x': field a.b'."""
    parts = list(loc)
    prefix = ""
    if len(parts) >= 2 and parts[0] == "customers" and isinstance(parts[1], int):
        idx = parts[1]
        cid = None
        try:
            cid = data["customers"][idx].get("id")
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
        prefix = f"customer {cid!r}" if cid else f"customer #{idx + 1}"
        parts = parts[2:]
    # pydantic nests the policy mapping under 'actions'; users never write that word.
    parts = [p for p in parts if p not in ("actions", "rules")]
    field = ".".join(str(p) for p in parts)
    if prefix and field:
        return f"{prefix}: field {field!r}"
    return prefix or (f"field {field!r}" if field else "top level")


def parse_customers(data: Any, source: str) -> Customers:
    try:
        parsed = CustomersFile.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {_where(data, err['loc'])}: {msg}")
        raise ConfigError("\n".join(lines)) from None
    return Customers(parsed.customers, source, parsed.regions)


def load_customers(path: str | Path, region: str = DEFAULT_REGION) -> Customers:
    """The customers file at ``path``, as seen from ``region`` (see :meth:`Customers.serving`)."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping with a 'customers' list")
    return parse_customers(data, str(path)).serving(region)
