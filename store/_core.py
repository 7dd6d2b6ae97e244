"""What the store's feature mixins may use of ClickHouseStore (for type checking only)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mailmeta.store._base import StoreError
from mailmeta.store._layout import SINGLE_NODE, Cluster, Layout

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
# How long a deletion waits for the parts it replaced to leave the disk before it fails.
PURGE_WAIT_S = 30.0
# A partition id no table has (ids are digits, hex hashes or 'all'): dropping it removes no
# rows, and ClickHouse clears the outdated parts from disk as part of the drop.
_NO_PARTITION = "mailmeta-no-such-partition"


def ms(dt: datetime) -> int:
    """A time as epoch milliseconds: bound as Int64, never formatted into SQL."""
    return int(dt.timestamp() * 1000)


class StoreCore:
    """Attributes and helpers ClickHouseStore provides to its mixins."""

    _retention: dict[str, int]
    _seed_retention: dict[str, int]
    _write_lock: threading.RLock
    # Where the tables live; ``_cluster`` is the same object when it is a cluster.
    _layout: Layout = SINGLE_NODE
    _cluster: Cluster | None = None

    def _alter(self, table: str) -> str:
        """What an ALTER … DELETE/UPDATE/MATERIALIZE or OPTIMIZE of ``table`` names: the table
        itself, or in cluster mode its local table (with ON CLUSTER where sharded)."""
        return self._layout.alter_target(table)

    def _insert_settings(self) -> dict[str, Any] | None:
        return self._layout.insert_settings

    def _delete(self, table: str, where: str, parameters: Mapping[str, Any]) -> None:
        """A DELETE mutation, waited for. ``where`` must hold no personal data once bound:
        ClickHouse keeps a mutation's text on disk after it ran."""
        self._command(
            f"ALTER TABLE {self._alter(table)} DELETE WHERE {where} SETTINGS mutations_sync = 2",
            parameters,
        )

    def _purge(self, tables: Sequence[str]) -> None:
        """Return once the parts of ``tables`` that are outdated now (those a mutation just
        replaced: the erased or expired rows' only remaining copies) are gone from disk.

        Migration 8 sets old_parts_lifetime = 0, so they may go at once. On one server
        (chdb or http) a no-op partition drop removes them now; a cluster's replicas remove
        them in their background clean-up. Parts that turn outdated later (merges of the
        rewritten parts) hold no erased rows. StoreError after PURGE_WAIT_S, e.g. while a
        long query still reads an old part: the rows are deleted, the call may be repeated.
        """
        cluster = self._cluster
        names = [self._layout.local(table) for table in tables]
        server_wide = cluster is not None and not cluster.emulated
        source = "system.parts"
        if cluster is not None and server_wide:
            source = f"clusterAllReplicas('{cluster.name}', system.parts)"
        sql = (
            f"SELECT DISTINCT table, name FROM {source} WHERE database = currentDatabase() "
            "AND table IN {t:Array(String)} AND NOT active"
        )
        pending = {(t, n) for t, n in self._rows(sql, {"t": names})}
        deadline = time.monotonic() + PURGE_WAIT_S
        pause = 0.01
        while pending:
            if not server_wide:
                for table in sorted({t for t, _ in pending}):
                    self._command(f"ALTER TABLE {table} DROP PARTITION ID '{_NO_PARTITION}'")
            pending &= {(t, n) for t, n in self._rows(sql, {"t": names})}
            if not pending:
                break
            if time.monotonic() > deadline:
                raise StoreError(
                    f"{len(pending)} replaced part(s) of {', '.join(names)} still on disk "
                    f"after {PURGE_WAIT_S:.0f} s (in use by a query?): the rows are deleted; "
                    "repeat the call to wait again"
                )
            time.sleep(pause)  # bounded poll: ClickHouse offers no wait for part removal
            pause = min(pause * 2, 0.5)

    if TYPE_CHECKING:

        def _command(self, sql: str, parameters: Mapping[str, Any] | None = None) -> object: ...

        def _rows(self, sql: str, parameters: Mapping[str, Any] | None = None) -> list[Any]: ...

        def _days(self, customer: str | None) -> int: ...

        def _insert_rows(self, table: Any) -> int: ...
