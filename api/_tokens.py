"""Token management routes (operators only): create (the clear token is returned once),
list (never hashes), revoke (effective on the very next request)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from mailmeta.api._deps import CustomersDep, StoreDep, known
from mailmeta.api._principals import SCOPES, Principal, authority_of, require_operator
from mailmeta.api._token_authority import TokenAuthority

Operator = Annotated[Principal, Depends(require_operator)]

router = APIRouter()


class TokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(default="", max_length=100)
    customer: str | None = Field(default=None, min_length=1, max_length=64)
    scopes: list[str] = Field(min_length=1, max_length=len(SCOPES))


def _authority(request: Request) -> TokenAuthority:
    authority = authority_of(request)
    if authority is None:
        raise HTTPException(409, "API tokens are off (MAILMETA_API_AUTH=false)")
    return authority


@router.post("/v1/tokens", status_code=201)
def create_token(
    request: Request,
    principal: Operator,
    store: StoreDep,
    customers: CustomersDep,
    body: TokenBody,
) -> dict[str, Any]:
    authority = _authority(request)
    if body.customer is not None:
        # A customer's token only where its data is: 421 for another region's customer.
        known(customers, body.customer)
    try:
        record, token = authority.create(body.name, body.customer, body.scopes)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    store.append_audit(
        principal.name,
        "token.create",
        body.customer or "*",
        {"token_id": record.token_id, "scopes": sorted(record.scopes)},
    )
    # The only time the clear token leaves this process.
    return {**record.public(), "token": token}


@router.get("/v1/tokens")
def list_tokens(request: Request, principal: Operator) -> dict[str, Any]:
    return {"tokens": [t.public() for t in _authority(request).tokens()]}


@router.delete("/v1/tokens/{token_id}")
def revoke_token(
    request: Request, principal: Operator, store: StoreDep, token_id: str
) -> dict[str, Any]:
    record = _authority(request).revoke(token_id)
    if record is None:
        raise HTTPException(404, "no such token")
    store.append_audit(
        principal.name, "token.revoke", record.customer_id or "*", {"token_id": token_id}
    )
    return record.public()
