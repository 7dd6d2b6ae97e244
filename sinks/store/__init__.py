"""Storage for redacted events: the Store interface and its ClickHouse backend."""

from mailmeta.sinks.store._base import (
    MAX_LIMIT,
    Erased,
    RetentionChange,
    Store,
    StoreError,
    UnstorableEvent,
)
from mailmeta.sinks.store._clickhouse import ClickHouseStore, safe_dsn
from mailmeta.sinks.store._migrations import MIGRATIONS, Migration

__all__ = [
    "MAX_LIMIT",
    "MIGRATIONS",
    "ClickHouseStore",
    "Erased",
    "Migration",
    "RetentionChange",
    "Store",
    "StoreError",
    "UnstorableEvent",
    "safe_dsn",
]
