"""What the store's feature mixins may use of ClickHouseStore (for type checking only)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mailmeta.store._cluster import Cluster

# A row is visible while younger than the shorter of the retention it was stored with and
# the customer's current one: a shortened promise applies at once, before any rewrite. The
# first condition is implied by the second; it is there so the primary key and partition
# pruning can use it.
VISIBLE = (
    "received_at > now64(3) - toIntervalDay({days:UInt16})"
    " AND received_at + toIntervalDay(least(retention_days, {days:UInt16})) > now64(3)"
)
# Duplicates of one event share the sorting key, hence the partition: FINAL may stay
# within partitions, which is much cheaper.
FINAL_SETTINGS = " SETTINGS do_not_merge_across_partitions_select_final = 1"


def ms(dt: datetime) -> int:
    """A time as epoch milliseconds: bound as Int64, never formatted into SQL."""
    return int(dt.timestamp() * 1000)


class StoreCore:
    """Attributes and helpers ClickHouseStore provides to its mixins."""

    _retention: dict[str, int]
    _seed_retention: dict[str, int]
    _write_lock: threading.RLock
    _cluster: Cluster | None = None

    def _alter(self, table: str) -> str:
        """What an ALTER … DELETE/UPDATE/MATERIALIZE or OPTIMIZE of ``table`` names: the table
        itself, or in cluster mode its local table (with ON CLUSTER where sharded)."""
        return table if self._cluster is None else self._cluster.alter_target(table)

    def _insert_settings(self) -> dict[str, Any] | None:
        # A Distributed insert returns only once every shard holds its rows (not queued on
        # this server): what the sink commits and what a rewrite then deletes is stored.
        return None if self._cluster is None else {"distributed_foreground_insert": 1}

    if TYPE_CHECKING:

        def _command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> object: ...

        def _rows(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[Any]: ...

        def _days(self, customer: str | None) -> int: ...
