"""Retention routes (admin): each customer's days, and changing them (rows past the new
limit expire at once; a warning names Kafka topics that keep data longer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from mailmeta.api._deps import Admin, CustomersDep, StoreDep, known
from mailmeta.config import Customers
from mailmeta.store import Store

# Called with the shortest retention in force; returns warnings about Kafka topics that
# keep data longer (set by SinkService, which knows the brokers).
TopicCheck = Callable[[int], list[str]]

router = APIRouter()


class RetentionBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    days: int = Field(ge=1, le=3650)


def _here(store: Store, customers: Customers) -> dict[str, int]:
    """The store's retention of this region's customers (the others' data is not here)."""
    mine = {c.id for c in customers.here()}
    return {c: days for c, days in store.retention().items() if c in mine}


@router.get("/v1/retention")
def get_retention(principal: Admin, store: StoreDep, customers: CustomersDep) -> dict[str, Any]:
    return {"retention_days": _here(store, customers)}


def _topic_warnings(request: Request, shortest: int) -> list[str]:
    check = cast("TopicCheck | None", getattr(request.app.state, "topic_retention_check", None))
    return check(shortest) if check is not None else []


@router.put("/v1/retention/{customer}")
def put_retention(
    request: Request,
    principal: Admin,
    store: StoreDep,
    customers: CustomersDep,
    customer: str,
    body: RetentionBody,
) -> dict[str, Any]:
    principal.check_customer(customer)
    known(customers, customer)
    change = store.set_retention(customer, body.days)
    counts = {"rows_updated": change.rows_updated, "rows_expired": change.rows_expired}
    store.append_audit(
        principal.name,
        "retention.set",
        customer,
        {"from_days": change.previous_days, "to_days": change.days, **counts},
    )
    return {
        "customer": customer,
        "retention_days": change.days,
        "previous_days": change.previous_days,
        **counts,
        "warnings": _topic_warnings(request, min(_here(store, customers).values())),
    }
