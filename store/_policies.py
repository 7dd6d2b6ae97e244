"""Store methods for redaction policies: the version history and retroactive rewrites.

Mixed into ClickHouseStore (uses its ``_rows``/``_command``/``_client``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
from pydantic import ValidationError

from mailmeta.config import Policy
from mailmeta.schema import Event, format_time
from mailmeta.store._base import StoreError
from mailmeta.store._core import FINAL_SETTINGS, StoreCore
from mailmeta.store._rows import SELECT_COLUMNS, row_to_message, to_arrow
from mailmeta.store._tables import POLICY_VERSIONS_TABLE, TABLE

POLICY_VERSIONS = POLICY_VERSIONS_TABLE


def _digest(document: Any) -> str | None:
    try:
        return Policy.model_validate(document).digest()
    except ValidationError:  # a document recorded before a check it now fails
        return None


_PAGE = 20_000


class PolicyStoreMixin(StoreCore):
    if TYPE_CHECKING:
        _write_lock: threading.RLock

        def _client(self) -> AbstractContextManager[Any]: ...

        def _without_erased(self, table: pa.Table) -> pa.Table: ...

    def record_policy_version(
        self, customer: str, version: int, document: Mapping[str, Any], actor: str, source: str
    ) -> None:
        """Keep every version's policy: preview and retroactive rewrites need to know how
        a stored row (stamped with its version) was redacted. A version is recorded once:
        again with the same document is a no-op, with another a StoreError (a version
        names one document forever)."""
        digest = Policy.model_validate(document).digest()
        with self._write_lock:
            known = self.policy_versions(customer).get(version)
            if known is not None:
                if known["digest"] == digest:
                    return
                raise StoreError(
                    f"policy version {version} of {customer!r} is recorded with another document"
                )
            self._command(
                f"INSERT INTO {POLICY_VERSIONS} (customer_id, version, policy, actor, source) "
                "SELECT {c:String}, {v:UInt32}, {p:String}, {a:String}, {s:String}",
                {"c": customer, "v": version, "p": orjson.dumps(document).decode(), "a": actor,
                 "s": source},
            )  # fmt: skip

    def policy_versions(self, customer: str) -> dict[int, dict[str, Any]]:
        """version -> its document, actor, source, time and digest (``Policy.digest``: what
        the version stands for, compared with what the topic and the workers hold)."""
        rows = self._rows(
            f"SELECT version, policy, actor, source, at FROM {POLICY_VERSIONS} FINAL "
            "WHERE customer_id = {c:String} ORDER BY version",
            {"c": customer},
        )
        out = {}
        for v, p, a, s, at in rows:
            doc = orjson.loads(p)
            out[int(v)] = {"policy": doc, "actor": a, "source": s, "at": format_time(at),
                           "digest": _digest(doc)}  # fmt: skip
        return out

    def erase_policy_history(self, customer: str) -> int:
        """Delete every recorded version of the customer's policy but the newest (the one in
        force while the customer is configured: rows stored from now on are redacted by it,
        and a restart restores it from here). Returns the number of versions removed."""
        params = {"c": customer}
        newest = self._rows(
            f"SELECT max(version), count() FROM {POLICY_VERSIONS} WHERE customer_id = {{c:String}}",
            params,
        )[0]
        if not newest[1]:
            return 0
        # The newest version bound as a constant, not a subquery: a replicated table
        # (cluster mode) refuses mutations with subqueries.
        where = "customer_id = {c:String} AND version < {v:UInt32}"
        bound = {"c": customer, "v": int(newest[0])}
        n = int(
            self._rows(f"SELECT count() FROM {POLICY_VERSIONS} FINAL WHERE {where}", bound)[0][0]
        )
        if n:
            self._command(
                f"ALTER TABLE {self._alter(POLICY_VERSIONS)} DELETE WHERE {where} "
                "SETTINGS mutations_sync = 2",
                bound,
            )
        return n

    def stored_versions(self, customer: str) -> dict[int, int]:
        """policy_version -> rows stored under it (physically, expired or not)."""
        rows = self._rows(
            f"SELECT policy_version, count() FROM {TABLE} WHERE customer_id = {{c:String}} "
            "GROUP BY policy_version ORDER BY policy_version",
            {"c": customer},
        )
        return {int(v): int(n) for v, n in rows}

    def rewrite_stored(
        self,
        customer: str,
        versions: list[int],
        new_version: int,
        rewrite: Callable[[dict[str, Any]], dict[str, Any] | None],
    ) -> int:
        """Rewrite the customer's rows stored under ``versions`` through ``rewrite`` (a
        schema dict -> the rewritten dict, or None: unchanged).

        No value and no key appears in any SQL text (a server keeps mutations' text in
        system.mutations): rewritten rows are inserted stamped ``new_version`` (so the
        ReplacingMergeTree keeps them), then the old copies are deleted by a mutation
        that names only the customer and versions. Returns the number rewritten.
        """
        if not versions:
            return 0
        cols = ", ".join((*SELECT_COLUMNS, "retention_days"))
        where = "customer_id = {c:String} AND has({vs:Array(UInt32)}, policy_version)"
        params: dict[str, Any] = {"c": customer, "vs": versions, "n": _PAGE}
        done = 0
        after: tuple[Any, str] | None = None
        while True:
            page_where = where
            if after is not None:
                page_where += " AND (received_at, event_id) > ({t:DateTime64(3, 'UTC')}, {e:UUID})"
                params["t"], params["e"] = after
            # FINAL: one surviving copy per event; an event whose newest copy is under
            # another version is not rewritten (its old copy would win once stamped newer).
            rows = self._rows(
                f"SELECT {cols} FROM {TABLE} FINAL WHERE {page_where} "
                "ORDER BY received_at, event_id LIMIT {n:UInt32}" + FINAL_SETTINGS,
                params,
            )
            if not rows:
                break
            after = (rows[-1][1], str(rows[-1][0]))
            by_days: dict[int, list[Event]] = {}
            for row in rows:
                msg = row_to_message(row[:-1])
                new = rewrite(msg)
                if new is not None:
                    new["policy_version"] = new_version
                    by_days.setdefault(int(row[-1]), []).append(Event(**new))
            for days, events in by_days.items():
                # As the sink's inserts: under the write lock and without erased events, so
                # an erasure that lands during the rewrite is not undone by it.
                # The hourly stats already count these events: the copies add nothing there.
                with self._write_lock:
                    done += self._insert_rows(to_arrow(events, {customer: days}))
            if len(rows) < _PAGE:
                break
        if done:
            self._delete_rewritten(customer, versions, new_version)
        return done

    def _delete_rewritten(self, customer: str, versions: list[int], new_version: int) -> None:
        """Delete the old copies of the customer's events that now have a rewritten copy."""
        local, settings = TABLE, "mutations_sync = 2"
        if self._cluster is not None:
            # Every copy of an event is on one shard, so the subquery may read the shard's
            # own rows. It makes the mutation non-deterministic to ClickHouse: each replica
            # evaluates it. Once each replica has fetched the rewritten parts the answers
            # agree; an event rewritten again meanwhile only leaves an old copy that FINAL
            # hides and the next merge drops.
            local = self._cluster.local(TABLE)
            if not self._cluster.emulated:
                self._command(f"SYSTEM SYNC REPLICA{self._cluster.on_cluster} {local} LIGHTWEIGHT")
            settings += ", allow_nondeterministic_mutations = 1"
        self._command(
            f"ALTER TABLE {self._alter(TABLE)} DELETE WHERE customer_id = {{c:String}} "
            "AND has({vs:Array(UInt32)}, policy_version) AND event_id IN "
            f"(SELECT event_id FROM {local} WHERE customer_id = {{c:String}} "
            f"AND policy_version = {{nv:UInt32}}) SETTINGS {settings}",
            {"c": customer, "vs": versions, "nv": new_version},
        )
