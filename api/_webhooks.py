"""Webhook endpoint routes (operators, or a customer's token with the ``webhooks`` scope):
create (the signing secret is returned once), list, read, change, delete, rotate the secret
(the old one keeps signing beside the new one for an overlap), the delivery and failure log,
and replay from a time. A URL must be http(s) and resolve to public addresses only, unless an
operator allowed the network (MAILMETA_WEBHOOK_ALLOW_NETWORKS): the stage checks again on
every connection."""

from __future__ import annotations

import base64
import secrets
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from mailmeta.api._deps import CustomersDep, StoreDep, known
from mailmeta.api._principals import Principal, require
from mailmeta.config import NetworkGuard, Refused, Settings
from mailmeta.schema import STATUSES, to_utc
from mailmeta.store import OutboxRow, Store, WebhookEndpoint, webhook_payload

Hooks = Annotated[Principal, Depends(require("webhooks"))]
router = APIRouter()
MAX_ENDPOINTS_PER_CUSTOMER = 20
_Status = Literal["accepted", "delivered", "deferred", "bounced", "expired", "rejected"]
assert set(_Status.__args__) == STATUSES  # type: ignore[attr-defined]


class EndpointBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    customer: str | None = Field(default=None, min_length=1, max_length=64)
    url: str = Field(min_length=8, max_length=2000)
    statuses: list[_Status] = Field(default_factory=list, max_length=len(STATUSES))
    active: bool = True


class EndpointPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: str | None = Field(default=None, min_length=8, max_length=2000)
    statuses: list[_Status] | None = Field(default=None, max_length=len(STATUSES))
    active: bool | None = None


class RotateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    # How long the old secret keeps signing beside the new one (receivers switch meanwhile).
    overlap_s: int = Field(default=86400, ge=0, le=7 * 86400)


class ReplayBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    since: datetime = Field(alias="from")


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _guard(request: Request) -> NetworkGuard:
    guard = getattr(request.app.state, "webhook_guard", None)
    if guard is None:
        guard = NetworkGuard.parse(Settings().webhook_allow_networks)
        request.app.state.webhook_guard = guard
    return cast(NetworkGuard, guard)


def _check_url(request: Request, url: str) -> None:
    try:
        _guard(request).check_url(url)
    except Refused as exc:
        raise HTTPException(400, f"url: {exc}") from None


def _wake(request: Request) -> None:
    """Tell an in-process webhook stage to look now (another process looks every second)."""
    wake = cast("Callable[[], None] | None", getattr(request.app.state, "webhook_wake", None))
    if wake is not None:
        wake()


def _mine(store: Store, principal: Principal, endpoint_id: str) -> WebhookEndpoint:
    endpoint = store.webhook_endpoint(endpoint_id)
    if endpoint is None or (
        principal.customer is not None and principal.customer != endpoint.customer_id
    ):
        raise HTTPException(404, "no such webhook endpoint")  # another's: not even its existence
    return endpoint


@router.post("/v1/webhooks", status_code=201)
def create_endpoint(
    request: Request,
    principal: Hooks,
    store: StoreDep,
    customers: CustomersDep,
    body: EndpointBody,
) -> dict[str, Any]:
    customer = principal.customer_or(body.customer)
    known(customers, customer)
    _check_url(request, body.url)
    if len(store.webhook_endpoints(customer)) >= MAX_ENDPOINTS_PER_CUSTOMER:
        raise HTTPException(409, f"at most {MAX_ENDPOINTS_PER_CUSTOMER} endpoints per customer")
    endpoint = WebhookEndpoint(
        endpoint_id=f"wh_{uuid.uuid4().hex[:16]}",
        customer_id=customer,
        url=body.url,
        statuses=frozenset(body.statuses),
        active=body.active,
        secret=new_secret(),
        created_at=datetime.now(UTC),
    )
    store.save_webhook_endpoint(endpoint)
    store.append_audit(
        principal.name,
        "webhook.create",
        customer,
        {"endpoint_id": endpoint.endpoint_id, "statuses": sorted(endpoint.statuses)},
    )
    # The only time the secret leaves the store.
    return {**endpoint.public(), "secret": endpoint.secret}


@router.get("/v1/webhooks")
def list_endpoints(
    principal: Hooks,
    store: StoreDep,
    customers: CustomersDep,
    customer: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
) -> dict[str, Any]:
    if customer is None and principal.customer is None:
        return {"endpoints": [e.public() for e in store.webhook_endpoints()]}
    customer = principal.customer_or(customer)
    known(customers, customer)
    return {"endpoints": [e.public() for e in store.webhook_endpoints(customer)]}


@router.get("/v1/webhooks/{endpoint_id}")
def get_endpoint(principal: Hooks, store: StoreDep, endpoint_id: str) -> dict[str, Any]:
    return _mine(store, principal, endpoint_id).public()


@router.patch("/v1/webhooks/{endpoint_id}")
def patch_endpoint(
    request: Request, principal: Hooks, store: StoreDep, endpoint_id: str, body: EndpointPatch
) -> dict[str, Any]:
    endpoint = _mine(store, principal, endpoint_id)
    if body.url is not None:
        _check_url(request, body.url)
        endpoint.url = body.url
    if body.statuses is not None:
        endpoint.statuses = frozenset(body.statuses)
    if body.active is not None:
        endpoint.active = body.active
    store.save_webhook_endpoint(endpoint)
    store.append_audit(
        principal.name,
        "webhook.update",
        endpoint.customer_id,
        {"endpoint_id": endpoint_id, "changed": sorted(body.model_fields_set)},
    )
    return endpoint.public()


@router.delete("/v1/webhooks/{endpoint_id}")
def delete_endpoint(principal: Hooks, store: StoreDep, endpoint_id: str) -> dict[str, Any]:
    endpoint = _mine(store, principal, endpoint_id)
    endpoint.deleted = True
    store.save_webhook_endpoint(endpoint)
    store.append_audit(
        principal.name, "webhook.delete", endpoint.customer_id, {"endpoint_id": endpoint_id}
    )
    return endpoint.public()


@router.post("/v1/webhooks/{endpoint_id}/rotate")
def rotate_secret(
    principal: Hooks, store: StoreDep, endpoint_id: str, body: RotateBody | None = None
) -> dict[str, Any]:
    endpoint = _mine(store, principal, endpoint_id)
    overlap = (body or RotateBody()).overlap_s
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_until = datetime.now(UTC) + timedelta(seconds=overlap)
    endpoint.secret = new_secret()
    store.save_webhook_endpoint(endpoint)
    store.append_audit(
        principal.name,
        "webhook.rotate",
        endpoint.customer_id,
        {"endpoint_id": endpoint_id, "overlap_s": overlap},
    )
    return {**endpoint.public(), "secret": endpoint.secret}


@router.get("/v1/webhooks/{endpoint_id}/deliveries")
def deliveries(
    principal: Hooks,
    store: StoreDep,
    endpoint_id: str,
    state: Literal["pending", "delivered", "failed"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The delivery log (status, attempts, last response code; never a body); ``state=failed``
    is the failure log."""
    endpoint = _mine(store, principal, endpoint_id)
    return {"deliveries": store.webhook_deliveries(endpoint.endpoint_id, state, limit)}


@router.post("/v1/webhooks/{endpoint_id}/replay", status_code=202)
def replay(
    request: Request, principal: Hooks, store: StoreDep, endpoint_id: str, body: ReplayBody
) -> dict[str, Any]:
    """Queue again every stored event of the endpoint's customer since ``from`` (within
    retention) that the endpoint subscribes to; they go out marked ``"replay": true`` under
    new webhook ids, after what is already queued."""
    endpoint = _mine(store, principal, endpoint_id)
    since = to_utc(body.since)
    assert since is not None
    replay_id = f"rp_{uuid.uuid4().hex[:16]}"
    chunk = time.time_ns()
    now = datetime.now(UTC)
    queued = seq = 0
    for page in store.export_pages(endpoint.customer_id, since=since):
        rows = []
        for event in page:
            if endpoint.statuses and event["status"] not in endpoint.statuses:
                continue
            payload = webhook_payload(event)
            rows.append(
                OutboxRow(
                    endpoint.endpoint_id,
                    event["event_id"],
                    endpoint.customer_id,
                    payload,
                    chunk,
                    seq,
                    now,
                    replay_id=replay_id,
                )
            )
            seq += 1
        queued += store.enqueue_webhooks(rows)
    store.append_audit(
        principal.name,
        "webhook.replay",
        endpoint.customer_id,
        {"endpoint_id": endpoint_id, "from": since.isoformat(), "events": queued},
    )
    _wake(request)
    return {"replay_id": replay_id, "events": queued}
