"""The ``Store`` protocol: everything callers may ask of storage, typed."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from mailmeta.schema import Event
from mailmeta.store._base import Erased, RetentionChange
from mailmeta.store._search import SearchStore
from mailmeta.store._tokens import TokenStore
from mailmeta.store._webhooks import WebhookStore


@dataclass(frozen=True)
class PreparedBatch:
    """Records decoded for insert_prepared, with the retention they were decoded under."""

    values: Sequence[bytes]
    retention: dict[str, int]
    table: pa.Table


@runtime_checkable
class PolicyStore(Protocol):
    """Every policy version ever in force, and the rows stored under each."""

    def record_policy_version(
        self, customer: str, version: int, document: Mapping[str, Any], actor: str, source: str
    ) -> None: ...

    def policy_versions(self, customer: str) -> dict[int, dict[str, Any]]: ...

    def stored_versions(self, customer: str) -> dict[int, int]: ...

    def erase_policy_history(self, customer: str) -> int: ...

    def rewrite_stored(
        self,
        customer: str,
        versions: list[int],
        new_version: int,
        rewrite: Callable[[dict[str, Any]], dict[str, Any] | None],
    ) -> int: ...


@runtime_checkable
class Store(SearchStore, TokenStore, PolicyStore, WebhookStore, Protocol):
    """Where redacted events land and are read back, with per-row retention.

    The one seam every caller uses: searching, tokens and policy history included, so no
    caller needs ``Any``, ``getattr`` or ``isinstance`` to reach a method.
    """

    def check_event(self, event: Event) -> str | None:
        """Why ``event`` cannot be stored, or None when it can."""
        ...

    def insert_events(self, events: Sequence[Event]) -> int:
        """Insert all of ``events`` (all or nothing); returns the number inserted.

        Raises UnstorableEvent before writing anything when one of them fails check_event.
        """
        ...

    def prepare_json(self, values: Sequence[bytes]) -> PreparedBatch | None:
        """Decode and check a batch of schema-v1 JSON values for ``insert_prepared``; None
        when any value needs the per-event path (``insert_events``)."""
        ...

    def insert_prepared(self, prepared: PreparedBatch) -> int | None:
        """Insert a prepared batch; None (nothing written) when it must be decoded again."""
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

    def erase_audit(self, customer: str) -> int:
        """Delete every audit record about ``customer`` (erasure on request: the caller then
        records the erasure itself); returns how many went."""
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
