"""Storage routes of the API: retention, erasure, export and hourly stats.

Included by ``create_api``. ``erase --all`` removes a customer's rows and aggregates, the
version history of its policy (all but the version in force), revokes its tokens and drops
their access log, and replaces its audit entries with one record of the erasure.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mailmeta.api._auth import Principal, TokenAuthority, authority_of, require
from mailmeta.config import Customers
from mailmeta.policy import stored_forms
from mailmeta.schema import FIELD_NAMES, format_time, to_utc
from mailmeta.store import Store

log = logging.getLogger("mailmeta.api")

# Called with the shortest retention in force; returns warnings about Kafka topics that
# keep data longer (set by SinkService, which knows the brokers).
TopicCheck = Callable[[int], list[str]]

# Stats come from hourly aggregates that live HOURLY_RETENTION_DAYS; one request may span that.
MAX_STATS_DAYS = 400
DEFAULT_STATS_DAYS = 7
_CUSTOMER = Query(min_length=1, max_length=64)
# RFC 5321 path: 256 octets; RFC 5322 line: 998.
_MAX_ADDRESS = 256
_MAX_MESSAGE_ID = 998


class RetentionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    days: int = Field(ge=1, le=3650)


class EraseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer: str = Field(min_length=1, max_length=64)
    address: str | None = Field(default=None, min_length=3, max_length=_MAX_ADDRESS)
    message_id: str | None = Field(default=None, min_length=1, max_length=_MAX_MESSAGE_ID)
    all: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> EraseBody:
        given = [n for n in ("address", "message_id", "all") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("give exactly one of 'address', 'message_id', 'all'")
        if self.address is not None and "@" not in self.address:
            raise ValueError("'address' must be an e-mail address (local@domain)")
        return self


def time_range(since: datetime | None, until: datetime | None) -> tuple[datetime | None, ...]:
    since, until = to_utc(since), to_utc(until)
    if since is not None and until is not None and since >= until:
        raise HTTPException(400, "'from' must be before 'to'")
    return since, until


def _keys(customers: Customers, customer: str) -> dict[str, bytes]:
    try:
        return customers.by_id[customer].keys()
    except (OSError, ValueError) as exc:
        # Erasing only clear values would silently miss hashed rows: refuse instead.
        log.error("customer %s: cannot read its hmac keys: %s", customer, exc)
        raise HTTPException(
            500, "the customer's hmac keys cannot be read; nothing was erased"
        ) from None


def _jsonl(pages: Iterator[list[dict[str, Any]]]) -> Iterator[bytes]:
    for page in pages:
        yield b"".join(orjson.dumps(m) + b"\n" for m in page)


# A spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV injection");
# subjects and addresses come from whoever sent the mail.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list):
        value = orjson.dumps(value).decode()
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value  # shown as text; the quote tells a reader it was neutralised
    return value


def _csv(pages: Iterator[list[dict[str, Any]]]) -> Iterator[bytes]:
    buf = io.StringIO()
    # RFC 4180 line ends: the writer then quotes any value holding a CR or an LF.
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(FIELD_NAMES)
    for page in pages:
        for m in page:
            writer.writerow([_csv_cell(m[f]) for f in FIELD_NAMES])
        yield buf.getvalue().encode()
        buf.seek(0)
        buf.truncate()
    if buf.tell():
        yield buf.getvalue().encode()


def _erase_customer_records(
    store: Store, authority: TokenAuthority | None, customer: str
) -> dict[str, int]:
    """Everything of ``customer`` besides its rows: policy history, tokens, audit."""
    policy_versions = store.erase_policy_history(customer)
    tokens = [t for t in store.load_tokens() if t.customer_id == customer]
    revoked = 0
    for t in tokens:
        if t.revoked_at is not None:
            continue
        if authority is not None:
            authority.revoke(t.token_id)  # in this replica's memory at once, then stored
        else:
            t.revoked_at = datetime.now(UTC)
            store.save_token(t)
        revoked += 1
    access = store.erase_access([t.token_id for t in tokens])
    # Last: the caller's record of the erasure is then the customer's only audit entry.
    audit = store.erase_audit(customer)
    return {
        "policy_versions_removed": policy_versions,
        "tokens_revoked": revoked,
        "access_log_entries_removed": access,
        "audit_entries_removed": audit,
    }


def storage_router(store: Store, customers: Customers) -> APIRouter:
    router = APIRouter()

    def known(customer: str) -> None:
        if customer not in customers.by_id:
            raise HTTPException(404, "unknown customer")

    @router.get("/v1/retention")
    def get_retention(
        principal: Annotated[Principal, Depends(require("admin"))],
    ) -> dict[str, Any]:
        return {"retention_days": store.retention()}

    @router.put("/v1/retention/{customer}")
    def put_retention(
        request: Request,
        principal: Annotated[Principal, Depends(require("admin"))],
        customer: str,
        body: RetentionBody,
    ) -> dict[str, Any]:
        principal.check_customer(customer)
        known(customer)
        change = store.set_retention(customer, body.days)
        store.append_audit(
            principal.name,
            "retention.set",
            customer,
            {
                "from_days": change.previous_days,
                "to_days": change.days,
                "rows_updated": change.rows_updated,
                "rows_expired": change.rows_expired,
            },
        )
        warnings: list[str] = []
        check: TopicCheck | None = getattr(request.app.state, "topic_retention_check", None)
        if check is not None:
            warnings = check(min(store.retention().values()))
        return {
            "customer": customer,
            "retention_days": change.days,
            "previous_days": change.previous_days,
            "rows_updated": change.rows_updated,
            "rows_expired": change.rows_expired,
            "warnings": warnings,
        }

    @router.post("/v1/erase")
    def erase(
        request: Request,
        principal: Annotated[Principal, Depends(require("admin"))],
        body: EraseBody,
    ) -> dict[str, Any]:
        principal.check_customer(body.customer)
        known(body.customer)
        if body.all:
            scope = "all"
            erased = store.erase(body.customer, everything=True)
        elif body.address is not None:
            scope = "address"
            # Lower-casing can only widen the match: the safe direction for an erasure.
            clear = [body.address, body.address.lower()]
            forms = stored_forms(clear, _keys(customers, body.customer))
            erased = store.erase(body.customer, addresses=forms)
        else:
            assert body.message_id is not None
            scope = "message_id"
            forms = stored_forms([body.message_id], _keys(customers, body.customer))
            erased = store.erase(body.customer, message_ids=forms)
        result: dict[str, Any] = {"scope": scope, "rows_removed": erased.rows}
        if body.all:
            result["aggregate_rows_removed"] = erased.aggregate_rows
            result.update(_erase_customer_records(store, authority_of(request), body.customer))
        # The audit names what kind of erasure and how much went, never the erased value.
        store.append_audit(principal.name, "erase", body.customer, result)
        return {"customer": body.customer, **result}

    @router.get("/v1/export")
    def export(
        principal: Annotated[Principal, Depends(require("export"))],
        customer: Annotated[str, _CUSTOMER],
        since: Annotated[datetime | None, Query(alias="from")] = None,
        until: Annotated[datetime | None, Query(alias="to")] = None,
        format: Annotated[Literal["jsonl", "csv"], Query()] = "jsonl",
    ) -> StreamingResponse:
        principal.check_customer(customer)
        known(customer)
        lo, hi = time_range(since, until)
        total = store.count_export(customer, lo, hi)
        pages = store.export_pages(customer, lo, hi)
        body, media = (
            (_jsonl(pages), "application/x-ndjson")
            if format == "jsonl"
            else (
                _csv(pages),
                "text/csv; charset=utf-8",
            )
        )
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return StreamingResponse(
            body,
            media_type=media,
            headers={
                # Rows visible when the export began (a progress bar's total, not a promise).
                "X-Mailmeta-Rows": str(total),
                "Content-Disposition": f'attachment; filename="{customer}-{stamp}.{format}"',
            },
        )

    @router.get("/v1/stats")
    def stats(
        principal: Annotated[Principal, Depends(require("stats:read"))],
        customer: Annotated[str, _CUSTOMER],
        since: Annotated[datetime | None, Query(alias="from")] = None,
        until: Annotated[datetime | None, Query(alias="to")] = None,
    ) -> JSONResponse:
        principal.check_customer(customer)
        known(customer)
        lo, hi = time_range(since, until)
        hi = hi or datetime.now(UTC)
        lo = lo or hi - timedelta(days=DEFAULT_STATS_DAYS)
        if lo >= hi:
            raise HTTPException(400, "'from' must be before 'to'")
        if hi - lo > timedelta(days=MAX_STATS_DAYS):
            raise HTTPException(400, f"'from'..'to' may span at most {MAX_STATS_DAYS} days")
        hours = store.hourly_stats(customer, lo, hi)
        totals: dict[str, dict[str, int]] = {}
        for h in hours:
            t = totals.setdefault(h["status"], {"messages": 0, "bytes": 0})
            t["messages"] += h["messages"]
            t["bytes"] += h["bytes"]
        return JSONResponse(
            {
                "customer": customer,
                "from": format_time(lo),
                "to": format_time(hi),
                "hours": hours,
                "totals": totals,
            }
        )

    return router
