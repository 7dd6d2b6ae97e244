"""Dependencies shared by the routers: the app's store and customers, the scope checks, and
the small lookups every resource makes (a known customer, a time range)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, cast

from fastapi import Depends, HTTPException, Query, Request

from mailmeta.api._errors import Misdirected
from mailmeta.api._principals import Principal, require
from mailmeta.config import Customer, Customers
from mailmeta.schema import to_utc
from mailmeta.store import Store


def get_store(request: Request) -> Store:
    """The store ``create_api`` was given (one per app: replicas may share a process)."""
    return cast(Store, request.app.state.store)


def get_customers(request: Request) -> Customers:
    return cast(Customers, request.app.state.customers)


StoreDep = Annotated[Store, Depends(get_store)]
CustomersDep = Annotated[Customers, Depends(get_customers)]
Admin = Annotated[Principal, Depends(require("admin"))]
# A customer named in the query string; a token bound to another one gets 403 later.
CustomerQuery = Query(min_length=1, max_length=64)


def known(customers: Customers, customer: str, message: str = "unknown customer") -> Customer:
    """The customer, if this region's: 404 when unknown, 421 when pinned to another region
    (every customer-scoped route asks this before it touches the store)."""
    found = customers.by_id.get(customer)
    if found is None:
        raise HTTPException(404, message)
    served_here(customers, found)
    return found


def served_here(customers: Customers, customer: Customer) -> None:
    """421 naming the region (and its API) that serves ``customer`` when it is not this one."""
    away = customers.served_elsewhere(customer.id)
    if away is not None:
        raise Misdirected(
            f"customer {customer.id!r} is served in {away.where()}; ask that region's API",
            away.region,
            away.api_url,
        )


def time_range(since: datetime | None, until: datetime | None) -> tuple[datetime | None, ...]:
    since, until = to_utc(since), to_utc(until)
    if since is not None and until is not None and since >= until:
        raise HTTPException(400, "'from' must be before 'to'")
    return since, until
