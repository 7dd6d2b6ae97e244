"""The storage seam: one typed interface the consumer and the API use, backends behind it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from mailmeta.schema import Event

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


@runtime_checkable
class Store(Protocol):
    """Where redacted events land and are read back, with per-row retention."""

    def check_event(self, event: Event) -> str | None:
        """Why ``event`` cannot be stored, or None when it can."""
        ...

    def insert_events(self, events: Sequence[Event]) -> int:
        """Insert all of ``events`` (all or nothing); returns the number inserted.

        Raises UnstorableEvent before writing anything when one of them fails check_event.
        """
        ...

    def query_messages(
        self, customer: str, message_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The customer's unexpired events, newest first, one per event_id, as schema dicts."""
        ...

    def count(self, customer: str | None = None, *, visible_only: bool = False) -> int:
        """Rows physically in the table, or (visible_only) the ones a query can return."""
        ...

    def force_ttl_merge(self) -> None:
        """Physically remove expired rows and merge duplicates now instead of eventually."""
        ...

    def append_audit(
        self, actor: str, action: str, customer_id: str, details: Mapping[str, Any]
    ) -> None:
        """Append one record to the audit log (never erased values: callers pass diffs/counts)."""
        ...

    def read_audit(self, customer: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Audit records, newest first; ``details`` decoded back to a mapping."""
        ...

    # --- retention (seeded by the customers file, overridden by `retention set`) -------------

    def retention(self) -> dict[str, int]:
        """The retention (days) in force per configured customer."""
        ...

    def set_retention(self, customer: str, days: int) -> RetentionChange:
        """Apply ``days`` to future rows (every sink learns it) and to stored rows."""
        ...

    # --- erasure -------------------------------------------------------------------------

    def erase(
        self,
        customer: str,
        *,
        addresses: Sequence[str] = (),
        message_ids: Sequence[str] = (),
        everything: bool = False,
    ) -> Erased:
        """Physically delete matching rows (and with ``everything`` the aggregates)."""
        ...

    # --- dashboards and export -----------------------------------------------------------

    def hourly_stats(self, customer: str, since: datetime, until: datetime) -> list[dict[str, Any]]:
        """Event counts and bytes per hour and status (hourly aggregates)."""
        ...

    def count_export(
        self, customer: str, since: datetime | None = None, until: datetime | None = None
    ) -> int: ...

    def export_pages(
        self,
        customer: str,
        since: datetime | None = None,
        until: datetime | None = None,
        page: int = ...,
    ) -> Iterator[list[dict[str, Any]]]:
        """Visible events oldest first, in bounded pages."""
        ...

    def schema_version(self) -> int: ...

    def ping(self) -> bool: ...

    def close(self) -> None: ...
