"""The storage seam: one typed interface the consumer and the API use, backends behind it."""

from __future__ import annotations

from dataclasses import dataclass

# The API's bounds; the store enforces the same so no caller can ask for an unbounded scan.
MAX_LIMIT = 1000


class UnstorableEvent(ValueError):
    """A schema-valid event the store cannot hold (unknown customer, value out of range …).

    The message names the field and the reason, never the value: it goes to logs.
    """


class StoreError(RuntimeError):
    """The storage backend failed (unreachable, query error); the caller may retry."""


@dataclass(frozen=True, slots=True)
class RetentionChange:
    customer: str
    previous_days: int
    days: int
    rows_updated: int
    rows_expired: int


@dataclass(frozen=True, slots=True)
class Erased:
    """What an erasure removed: stored rows (every physical copy) and aggregate rows."""

    rows: int
    aggregate_rows: int = 0
