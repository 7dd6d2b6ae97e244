"""Hourly stats (scope ``stats:read``): messages and bytes per hour and status, from the
hourly aggregates (which outlive the rows: one request may span MAX_STATS_DAYS)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import JSONResponse

from mailmeta.api._deps import CustomerQuery, CustomersDep, StoreDep, known, time_range
from mailmeta.api._principals import Principal, require
from mailmeta.schema import format_time

MAX_STATS_DAYS = 400
DEFAULT_STATS_DAYS = 7

router = APIRouter()


def _window(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    lo, hi = time_range(since, until)
    hi = hi or datetime.now(UTC)
    lo = lo or hi - timedelta(days=DEFAULT_STATS_DAYS)
    if lo >= hi:
        raise HTTPException(400, "'from' must be before 'to'")
    if hi - lo > timedelta(days=MAX_STATS_DAYS):
        raise HTTPException(400, f"'from'..'to' may span at most {MAX_STATS_DAYS} days")
    return lo, hi


@router.get("/v1/stats")
def stats(
    principal: Annotated[Principal, Depends(require("stats:read"))],
    store: StoreDep,
    customers: CustomersDep,
    customer: Annotated[str, CustomerQuery],
    since: Annotated[datetime | None, Query(alias="from")] = None,
    until: Annotated[datetime | None, Query(alias="to")] = None,
) -> JSONResponse:
    principal.check_customer(customer)
    known(customers, customer)
    lo, hi = _window(since, until)
    hours = store.hourly_stats(customer, lo, hi)
    totals: dict[str, dict[str, int]] = {}
    for h in hours:
        t = totals.setdefault(h["status"], {"messages": 0, "bytes": 0})
        t["messages"] += h["messages"]
        t["bytes"] += h["bytes"]
    body = {"customer": customer, "from": format_time(lo), "to": format_time(hi)}
    return JSONResponse({**body, "hours": hours, "totals": totals})
