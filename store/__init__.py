"""The storage seam: one typed ``Store`` protocol and its ClickHouse backend (chdb or http(s)).

Every stage and the API reach storage only through the names exported here.
"""

from mailmeta.store._base import (
    MAX_LIMIT,
    Erased,
    RetentionChange,
    StoreError,
    UnstorableEvent,
)
from mailmeta.store._clickhouse import ClickHouseStore, safe_dsn
from mailmeta.store._migrations import MIGRATIONS, Migration, migrate
from mailmeta.store._protocol import PolicyStore, PreparedBatch, Store
from mailmeta.store._rows import ARROW_SCHEMA, arrow_from_json, to_arrow
from mailmeta.store._search import Cursor, SearchFilter, SearchStore
from mailmeta.store._tables import TABLE
from mailmeta.store._tokens import AccessRecord, TokenRecord, TokenStore
from mailmeta.store._webhooks import OutboxRow, WebhookEndpoint, WebhookStore, webhook_payload

__all__ = [
    "ARROW_SCHEMA",
    "MAX_LIMIT",
    "MIGRATIONS",
    "TABLE",
    "AccessRecord",
    "ClickHouseStore",
    "Cursor",
    "Erased",
    "Migration",
    "OutboxRow",
    "PolicyStore",
    "PreparedBatch",
    "RetentionChange",
    "SearchFilter",
    "SearchStore",
    "Store",
    "StoreError",
    "TokenRecord",
    "TokenStore",
    "UnstorableEvent",
    "WebhookEndpoint",
    "WebhookStore",
    "arrow_from_json",
    "migrate",
    "safe_dsn",
    "to_arrow",
    "webhook_payload",
]
