"""Erasure on request: physical deletion (a mutation, waited for) of a customer's rows, and
the erasure log every insert applies, so a topic replay cannot bring erased events back."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mailmeta.store._base import Erased
from mailmeta.store._core import StoreCore, ms
from mailmeta.store._tables import (
    ERASURE_LOG_DAYS,
    ERASURE_LOG_TABLE,
    HOURLY_EVENTS_TABLE,
    HOURLY_TABLE,
    TABLE,
    WEBHOOK_OUTBOX_TABLE,
)

log = logging.getLogger("mailmeta.store")

# An HMAC as the redactor stores it (``k1:hex`` or bare hex): logged even when no stored row
# holds it yet (the event may still be in a topic), as it reveals no clear value.
_HASHED = re.compile(r"(?:[A-Za-z0-9_-]{1,16}:)?[0-9a-f]{64}")
# Event ids per DELETE mutation (each rewrites the parts holding them; its text lists them).
ERASE_IDS_PER_MUTATION = 10_000


@dataclass
class Erasures:
    """One customer's erasure log: each form (and 'all') with the latest time it was erased."""

    everything: int | None = None  # epoch ms
    addresses: dict[str, int] = field(default_factory=dict)
    message_ids: dict[str, int] = field(default_factory=dict)


def _latest(into: dict[str, int], forms: Sequence[str], at: int) -> None:
    for f in forms:
        into[f] = max(at, into.get(f, at))


def _at_most(received: pa.Array, values: pa.Array, times: dict[str, int]) -> pa.Array:
    """Rows whose ``values`` is a logged form erased at or after the row's received time."""
    if not times:
        return pa.array([False] * len(received))
    idx = pc.index_in(values, value_set=pa.array(list(times), type=pa.string()))
    erased_at = pc.take(pa.array(list(times.values()), type=pa.int64()), idx)
    return pc.fill_null(pc.less_equal(received, erased_at), False)


def drop_erased(table: pa.Table, log: dict[str, Erasures]) -> pa.Table:
    """``table`` without the events the erasure log names (received before their erasure)."""
    if not log or not table.num_rows:
        return table
    customers = table.column("customer_id").combine_chunks()
    if not pc.any(pc.is_in(customers, value_set=pa.array(list(log)))).as_py():
        return table
    received = table.column("received_at").combine_chunks().cast(pa.int64())
    mail_from = table.column("mail_from").combine_chunks()
    message_id = table.column("message_id").combine_chunks()
    rcpt = table.column("rcpt_to").combine_chunks()
    flat, parents = pc.list_flatten(rcpt), pc.list_parent_indices(rcpt)
    drop = pa.array([False] * table.num_rows)
    for customer, e in log.items():
        hit = _at_most(received, mail_from, e.addresses)
        hit = pc.or_(hit, _at_most(received, message_id, e.message_ids))
        if e.everything is not None:
            hit = pc.or_(hit, pc.less_equal(received, pa.scalar(e.everything, pa.int64())))
        if e.addresses and len(flat):
            per_rcpt = _at_most(pc.take(received, parents), flat, e.addresses)
            rows = pc.filter(parents, per_rcpt)
            hit = pc.or_(hit, pc.is_in(pa.array(range(table.num_rows)), value_set=rows))
        drop = pc.or_(drop, pc.and_(pc.equal(customers, customer), hit))
    return table.filter(pc.invert(drop))


class ErasureMixin(StoreCore):
    _erasure_log: dict[str, Erasures]
    _erasure_mark: tuple[int, int] | None = None

    def erase(
        self,
        customer: str,
        *,
        addresses: Sequence[str] = (),
        message_ids: Sequence[str] = (),
        everything: bool = False,
    ) -> Erased:
        """Delete the customer's rows whose sender or a recipient is one of ``addresses``,
        or whose message id is one of ``message_ids``, or (``everything``) all of them and
        the customer's hourly aggregates. Callers pass every stored form of a value (clear
        and HMAC'd): the store matches values, it does not know keys.

        The erasure is logged first (for ERASURE_LOG_DAYS): every later insert drops the
        events it names that were received before it, so a replay of a topic cannot bring
        them back. The log keeps the forms that matched stored rows, and hashes; a clear
        value no row held is not written down.

        Returns once the deleted rows are off the disk, not only out of queries: the parts
        the mutations replaced are removed before the call returns (``_purge``).
        """
        if everything == bool(addresses or message_ids):
            raise ValueError("give addresses or message ids, or everything, not both")
        params: dict[str, Any] = {"c": customer}
        where = "customer_id = {c:String}"
        if not everything:
            match = []
            if addresses:
                params["a"] = list(addresses)
                match.append("mail_from IN {a:Array(String)} OR hasAny(rcpt_to, {a:Array(String)})")
            if message_ids:
                params["m"] = list(message_ids)
                match.append("message_id IN {m:Array(String)}")
            where += f" AND ({' OR '.join(match)})"
        # Held against inserts so the count is what the mutation removes (a batch landing
        # in between could otherwise be deleted uncounted), and so no batch of this process
        # lands between the log entry and the deletion.
        with self._write_lock:
            rows = int(self._rows(f"SELECT count() FROM {TABLE} WHERE {where}", params)[0][0])
            # ClickHouse keeps a mutation's text on disk (mutation_N.txt) long after it ran:
            # a value-matching one would write the erased values down. Delete by event id
            # (random, minted at ingest: they name no one) or by customer instead.
            ids = (
                []
                if everything or not rows
                else [
                    r[0]
                    for r in self._rows(
                        f"SELECT DISTINCT toString(event_id) FROM {TABLE} WHERE {where}", params
                    )
                ]
            )
            self._log_erasure(customer, params, rows, everything)
            if everything and rows:
                self._delete(TABLE, "customer_id = {c:String}", {"c": customer})
            for i in range(0, len(ids), ERASE_IDS_PER_MUTATION):
                self._delete(
                    TABLE,
                    "customer_id = {c:String} AND event_id IN {ids:Array(UUID)}",
                    {"c": customer, "ids": ids[i : i + ERASE_IDS_PER_MUTATION]},
                )
            aggregates = 0
            purge = [TABLE]
            # The webhook outbox holds the same redacted events, waiting to be sent (or kept
            # for replay): what is erased is neither kept there nor sent after the call.
            if everything or ids:
                self._delete_from_outbox(customer, None if everything else ids)
                purge.append(WEBHOOK_OUTBOX_TABLE)
            if everything:
                purge += [HOURLY_EVENTS_TABLE, HOURLY_TABLE, ERASURE_LOG_TABLE]
                for table in (HOURLY_EVENTS_TABLE, HOURLY_TABLE):
                    n = int(
                        self._rows(
                            f"SELECT count() FROM {table} WHERE customer_id = {{c:String}}", params
                        )[0][0]
                    )
                    if n:
                        self._delete(table, "customer_id = {c:String}", {"c": customer})
                    aggregates += n
            # Physically: the parts the mutations replaced still hold the erased rows.
            self._purge(purge)
        return Erased(rows, aggregates)

    def _delete_from_outbox(self, customer: str, ids: list[str] | None) -> None:
        if ids is None:
            self._delete(WEBHOOK_OUTBOX_TABLE, "customer_id = {c:String}", {"c": customer})
            return
        for i in range(0, len(ids), ERASE_IDS_PER_MUTATION):
            self._delete(
                WEBHOOK_OUTBOX_TABLE,
                "customer_id = {c:String} AND event_id IN {ids:Array(UUID)}",
                {"c": customer, "ids": ids[i : i + ERASE_IDS_PER_MUTATION]},
            )

    def _log_erasure(
        self, customer: str, params: dict[str, Any], rows: int, everything: bool
    ) -> None:
        entries: list[tuple[str, list[str]]] = []
        if everything:
            entries.append(("all", []))
        for scope, key, sql in (
            (
                "address",
                "a",
                f"SELECT DISTINCT f FROM {TABLE} ARRAY JOIN "
                "arrayConcat(rcpt_to, [ifNull(mail_from, '')]) AS f "
                "WHERE customer_id = {c:String} AND f IN {a:Array(String)}",
            ),
            (
                "message_id",
                "m",
                f"SELECT DISTINCT message_id FROM {TABLE} "
                "WHERE customer_id = {c:String} AND message_id IN {m:Array(String)}",
            ),
        ):
            forms: list[str] = params.get(key, [])
            held = {r[0] for r in self._rows(sql, params)} if forms and rows else set()
            logged = sorted({f for f in forms if f in held or _HASHED.fullmatch(f)})
            if logged:
                entries.append((scope, logged))
        now = datetime.now(UTC)
        for scope, logged in entries:
            self._command(
                f"INSERT INTO {ERASURE_LOG_TABLE} (customer_id, at, scope, forms) SELECT "
                "{c:String}, fromUnixTimestamp64Milli({at:Int64}, 'UTC'), {s:String}, "
                "{f:Array(String)}",
                {"c": customer, "at": ms(now), "s": scope, "f": logged},
            )
        if everything:
            # 'all' covers the customer's earlier entries: they need not keep their forms.
            self._delete(
                ERASURE_LOG_TABLE, "customer_id = {c:String} AND scope != 'all'", {"c": customer}
            )
        self._erasure_mark = None  # reload before the next insert

    def _erasures(self) -> dict[str, Erasures]:
        """The erasure log in force, re-read when it changed (another process may erase)."""
        mark_rows = self._rows(
            f"SELECT count(), toUnixTimestamp64Milli(max(at)) FROM {ERASURE_LOG_TABLE}"
        )
        mark = (int(mark_rows[0][0]), int(mark_rows[0][1]))
        if mark == self._erasure_mark:
            return self._erasure_log
        entries: dict[str, Erasures] = {}
        for customer, at, scope, forms in self._rows(
            f"SELECT customer_id, toUnixTimestamp64Milli(at), scope, forms "
            f"FROM {ERASURE_LOG_TABLE} "
            f"WHERE at > now64(3) - toIntervalDay({ERASURE_LOG_DAYS})"
        ):
            e = entries.setdefault(customer, Erasures())
            if scope == "all":
                e.everything = max(int(at), e.everything or 0)
            elif scope == "address":
                _latest(e.addresses, forms, int(at))
            elif scope == "message_id":
                _latest(e.message_ids, forms, int(at))
        self._erasure_log, self._erasure_mark = entries, mark
        return entries

    def _without_erased(self, table: pa.Table) -> pa.Table:
        """The batch without erased events (call with the write lock held)."""
        kept = drop_erased(table, self._erasures())
        if kept.num_rows < table.num_rows:
            log.info("dropped %d erased event(s) from an insert", table.num_rows - kept.num_rows)
        return kept
