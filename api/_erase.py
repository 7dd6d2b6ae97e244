"""Erasure (admin): by address, by Message-ID, or everything of a customer.

``erase --all`` removes a customer's rows and aggregates, the version history of its policy
(all but the version in force), revokes its tokens and drops their access log, and replaces
its audit entries with one record of the erasure.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mailmeta.api._deps import Admin, CustomersDep, StoreDep, known
from mailmeta.api._principals import authority_of
from mailmeta.api._token_authority import TokenAuthority
from mailmeta.config import Customers
from mailmeta.policy import stored_forms
from mailmeta.store import Erased, Store

log = logging.getLogger("mailmeta.api")

# RFC 5321 path: 256 octets; RFC 5322 line: 998.
_MAX_ADDRESS = 256
_MAX_MESSAGE_ID = 998

router = APIRouter()


class EraseBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
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


def _keys(customers: Customers, customer: str) -> dict[str, bytes]:
    try:
        return customers.by_id[customer].keys()
    except (OSError, ValueError) as exc:
        # Erasing only clear values would silently miss hashed rows: refuse instead.
        log.error("customer %s: cannot read its hmac keys: %s", customer, exc)
        raise HTTPException(
            500, "the customer's hmac keys cannot be read; nothing was erased"
        ) from None


def _erase_rows(store: Store, customers: Customers, body: EraseBody) -> tuple[str, Erased]:
    """Which kind of erasure, and what it removed."""
    if body.all:
        return "all", store.erase(body.customer, everything=True)
    if body.address is not None:
        # Lower-casing can only widen the match: the safe direction for an erasure.
        clear = [body.address, body.address.lower()]
        forms = stored_forms(clear, _keys(customers, body.customer))
        return "address", store.erase(body.customer, addresses=forms)
    assert body.message_id is not None
    forms = stored_forms([body.message_id], _keys(customers, body.customer))
    return "message_id", store.erase(body.customer, message_ids=forms)


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


@router.post("/v1/erase")
def erase(
    request: Request,
    principal: Admin,
    store: StoreDep,
    customers: CustomersDep,
    body: EraseBody,
) -> dict[str, Any]:
    principal.check_customer(body.customer)
    known(customers, body.customer)
    scope, erased = _erase_rows(store, customers, body)
    result: dict[str, Any] = {"scope": scope, "rows_removed": erased.rows}
    if body.all:
        result["aggregate_rows_removed"] = erased.aggregate_rows
        result.update(_erase_customer_records(store, authority_of(request), body.customer))
    # The audit names what kind of erasure and how much went, never the erased value.
    store.append_audit(principal.name, "erase", body.customer, result)
    return {"customer": body.customer, **result}
