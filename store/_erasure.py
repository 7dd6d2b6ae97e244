"""Erasure on request: physical deletion (a mutation, waited for) of a customer's rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mailmeta.store._base import Erased
from mailmeta.store._core import StoreCore
from mailmeta.store._migrations import HOURLY_EVENTS_TABLE, HOURLY_TABLE, TABLE


class ErasureMixin(StoreCore):
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
        # in between could otherwise be deleted uncounted).
        with self._write_lock:
            rows = int(self._rows(f"SELECT count() FROM {TABLE} WHERE {where}", params)[0][0])
            if rows:
                self._command(
                    f"ALTER TABLE {TABLE} DELETE WHERE {where} SETTINGS mutations_sync = 2",
                    params,
                )
            aggregates = 0
            if everything:
                for table in (HOURLY_EVENTS_TABLE, HOURLY_TABLE):
                    n = int(
                        self._rows(
                            f"SELECT count() FROM {table} WHERE customer_id = {{c:String}}", params
                        )[0][0]
                    )
                    if n:
                        self._command(
                            f"ALTER TABLE {table} DELETE WHERE customer_id = {{c:String}} "
                            "SETTINGS mutations_sync = 2",
                            params,
                        )
                    aggregates += n
        return Erased(rows, aggregates)
