"""Loading the customers file, with errors that name the file, the customer and the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mailmeta.config._models import Customer, CustomersFile


class ConfigError(ValueError):
    """The configuration is invalid; the message names file, customer and field."""


class Customers:
    """The validated customers, indexed by id and by recipient domain."""

    def __init__(self, customers: list[Customer], source: str = "<memory>") -> None:
        self.source = source
        self.by_id: dict[str, Customer] = {c.id: c for c in customers}
        self._by_domain: dict[str, Customer] = {d: c for c in customers for d in c.domains}

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
        return min(c.retention_days for c in self.by_id.values())


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
    return Customers(parsed.customers, source)


def load_customers(path: str | Path) -> Customers:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping with a 'customers' list")
    return parse_customers(data, str(path))
