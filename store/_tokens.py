"""API tokens and their access log in ClickHouse (a ClickHouseStore mixin).

Only a hash of each token's secret is stored. The table is a ReplacingMergeTree keyed by
token_id: a revocation is a newer row for the same id, and reads use FINAL so the newest
state wins at once, before any merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mailmeta.schema import format_time, to_utc
from mailmeta.store._core import StoreCore
from mailmeta.store._tables import ACCESS_LOG_TABLE, TOKENS_TABLE

_TOKEN_COLUMNS = (
    "token_id, name, customer_id, scopes, secret_hash, created_at, revoked_at, updated_at"
)


@dataclass(slots=True)
class TokenRecord:
    token_id: str
    name: str
    customer_id: str | None  # None: every customer (operators)
    scopes: frozenset[str]
    secret_hash: str = field(repr=False)
    created_at: datetime
    revoked_at: datetime | None = None
    updated_at: datetime | None = None

    def public(self) -> dict[str, Any]:
        """What `token list` shows: never the hash."""
        return {
            "id": self.token_id,
            "name": self.name,
            "customer": self.customer_id,
            "scopes": sorted(self.scopes),
            "created_at": format_time(self.created_at),
            "revoked_at": format_time(self.revoked_at) if self.revoked_at else None,
        }


@dataclass(frozen=True, slots=True)
class AccessRecord:
    at: datetime
    token_id: str
    method: str
    route: str
    status: int
    latency_ms: float


@runtime_checkable
class TokenStore(Protocol):
    def save_token(self, record: TokenRecord) -> None: ...

    def load_tokens(self) -> list[TokenRecord]: ...

    def tokens_stamp(self) -> tuple[int, int]: ...

    def append_access(self, records: Sequence[AccessRecord]) -> None: ...

    def read_access(
        self, token_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]: ...

    def erase_access(self, token_ids: Sequence[str]) -> int: ...


class TokensMixin(StoreCore):
    """Needs the host's ``_command`` / ``_rows`` / ``_client`` (ClickHouseStore)."""

    if TYPE_CHECKING:

        def _client(self) -> AbstractContextManager[Any]: ...

    def save_token(self, record: TokenRecord) -> None:
        now = datetime.now(UTC)
        self._command(
            f"INSERT INTO {TOKENS_TABLE} ({_TOKEN_COLUMNS}) SELECT {{id:String}}, {{name:String}},"
            " {customer:Nullable(String)}, {scopes:Array(String)}, {hash:String},"
            " {created:DateTime64(3, 'UTC')}, {revoked:Nullable(DateTime64(3, 'UTC'))},"
            " {updated:DateTime64(3, 'UTC')}",
            {
                "id": record.token_id,
                "name": record.name,
                "customer": record.customer_id,
                "scopes": sorted(record.scopes),
                "hash": record.secret_hash,
                "created": record.created_at,
                "revoked": record.revoked_at,
                "updated": now,
            },
        )
        record.updated_at = now

    def load_tokens(self) -> list[TokenRecord]:
        rows = self._rows(f"SELECT {_TOKEN_COLUMNS} FROM {TOKENS_TABLE} FINAL ORDER BY created_at")
        out = []
        for tid, name, cust, scopes, h, created, revoked, updated in rows:
            created_utc = to_utc(created)
            assert created_utc is not None
            out.append(
                TokenRecord(
                    tid,
                    name,
                    cust,
                    frozenset(scopes),
                    h,
                    created_utc,
                    to_utc(revoked),
                    to_utc(updated),
                )
            )
        return out

    def tokens_stamp(self) -> tuple[int, int]:
        """A fingerprint of every token's current state (FINAL, so merges do not change it):
        it changes whenever any process creates or revokes a token. One small query, cheap
        enough to ask on every API request."""
        rows = self._rows(
            "SELECT groupBitXor(cityHash64(token_id, name, ifNull(customer_id, ''), scopes,"
            f" secret_hash, ifNull(toString(revoked_at), ''))), count() FROM {TOKENS_TABLE} FINAL"
        )
        return int(rows[0][0]), int(rows[0][1])

    def append_access(self, records: Sequence[AccessRecord]) -> None:
        if not records:
            return
        with self._client() as c:
            c.insert(
                ACCESS_LOG_TABLE,
                [[r.at, r.token_id, r.method, r.route, r.status, r.latency_ms] for r in records],
                column_names=["at", "token_id", "method", "route", "status", "latency_ms"],
                settings=self._insert_settings(),
            )

    def erase_access(self, token_ids: Sequence[str]) -> int:
        """Delete the access-log records of these tokens (a customer's erasure)."""
        if not token_ids:
            return 0
        params = {"t": list(token_ids)}
        where = "token_id IN {t:Array(String)}"
        n = int(self._rows(f"SELECT count() FROM {ACCESS_LOG_TABLE} WHERE {where}", params)[0][0])
        if n:
            self._command(
                f"ALTER TABLE {self._alter(ACCESS_LOG_TABLE)} DELETE WHERE {where} "
                "SETTINGS mutations_sync = 2",
                params,
            )
        return n

    def read_access(self, token_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        where = ""
        if token_id is not None:
            where = " WHERE token_id = {t:String}"
            params["t"] = token_id
        rows = self._rows(
            f"SELECT at, token_id, method, route, status, latency_ms FROM {ACCESS_LOG_TABLE}"
            f"{where} ORDER BY at DESC LIMIT {{limit:UInt32}}",
            params,
        )
        return [
            {
                "at": format_time(to_utc(at) or datetime.now(UTC)),
                "token_id": tid,
                "method": m,
                "route": route,
                "status": int(st),
                "latency_ms": float(lat),
            }
            for at, tid, m, route, st, lat in rows
        ]
