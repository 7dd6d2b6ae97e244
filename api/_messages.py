"""Message routes: search with cursor pages, one message with its status history, and
who-am-I.

Every query is bound to one customer: a customer token's own (``customer`` may be omitted, a
different one is 403), or the one an operator names. Filters on fields a policy HMACs take the
clear value: the API hashes it with the customer's key and matches both forms, so rows stored
under an older policy that kept the value still match. Policies are the versions in force
(``_in_force``), not the customers file's: an operator may have changed one since.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import JSONResponse

from mailmeta.api._deps import (
    CustomerQuery,
    CustomersDep,
    StoreDep,
    known,
    served_here,
    time_range,
)
from mailmeta.api._in_force import InForceDep, redaction_info
from mailmeta.api._principals import Principal, current_principal, require
from mailmeta.config import Action, Customer, Customers, Policy
from mailmeta.policy import UnsearchableField, search_forms, stored_as
from mailmeta.schema import STATUSES
from mailmeta.store import MAX_LIMIT, Cursor, SearchFilter

log = logging.getLogger("mailmeta.api")

_MAX_TEXT = 998  # RFC 5322 line length: nothing longer can match
_Text = Query(min_length=1, max_length=_MAX_TEXT)
Reader = Annotated[Principal, Depends(require("messages:read"))]

router = APIRouter()


def encode_cursor(c: Cursor) -> str:
    return base64.urlsafe_b64encode(f"{c.received_ms}.{c.event_id}".encode()).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        at, _, eid = raw.partition(".")
        return Cursor(int(at), str(uuid.UUID(eid)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise HTTPException(400, "invalid cursor") from None


def _forms(
    customer: Customer, versions: dict[int, Policy], field: str, value: str | None
) -> tuple[str, ...]:
    try:
        return search_forms(customer, field, value, versions.values())
    except UnsearchableField as exc:
        raise HTTPException(400, str(exc)) from None
    except (OSError, ValueError) as exc:
        log.error("customer %s: cannot read its hmac keys: %s", customer.id, exc)
        raise HTTPException(503, "the customer's hmac key cannot be read") from None


def _customer_for(customers: Customers, principal: Principal, requested: str | None) -> Customer:
    return known(customers, principal.customer_or(requested))


@router.get("/v1/me")
def me(
    principal: Annotated[Principal, Depends(current_principal)],
    customers: CustomersDep,
    live: InForceDep,
) -> JSONResponse:
    """Who this token is: its scopes, the region this API serves and the customers it may
    see there (with the policy version in force of each). Other regions' customers are not
    listed: every question about them here would be answered 421."""
    own = customers.by_id.get(principal.customer or "")
    if own is not None:
        served_here(customers, own)  # a token of a customer pinned elsewhere: 421
    here = customers.regional()
    visible = [c for c in here if principal.customer in (None, c.id)]
    policies = live.records(here)
    return JSONResponse(
        {
            "name": principal.name,
            "token_id": principal.token_id,
            "scopes": sorted(principal.scopes),
            "customer": principal.customer,
            "region": customers.region,
            "customers": [
                {"id": c.id, "redaction": redaction_info(p.policy, p.version)}
                for c in visible
                for p in [policies[c.id]]
            ],
        }
    )


def _search_filter(
    c: Customer,
    versions: dict[int, Policy],
    lo: datetime | None,
    hi: datetime | None,
    status: list[str] | None,
    text: dict[str, str | None],
) -> SearchFilter:
    bad = sorted(set(status or ()) - STATUSES)
    if bad:
        raise HTTPException(400, f"unknown status; expected one of {', '.join(sorted(STATUSES))}")
    subject = text["subject"]
    # Rows stored under any version that kept subjects can match.
    if subject is not None and Action.keep not in stored_as(versions.values(), "subject"):
        raise HTTPException(400, "this customer's policy does not keep subjects")
    return SearchFilter(
        since=lo,
        until=hi,
        statuses=tuple(status or ()),
        senders=_forms(c, versions, "mail_from", text["sender"]),
        recipients=_forms(c, versions, "rcpt_to", text["recipient"]),
        message_ids=_forms(c, versions, "message_id", text["message_id"]),
        subject=subject,
    )


def _redaction_by_version(
    versions: dict[int, Policy], rows: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """How each version the rows were stored under redacts (what the dashboard tags each
    cell by: a row keeps the form its version gave it)."""
    stamped = sorted(versions.keys() & {r.get("policy_version") for r in rows})
    return {str(v): redaction_info(versions[v], v) for v in stamped}


@router.get("/v1/messages")
def messages(
    principal: Reader,
    store: StoreDep,
    customers: CustomersDep,
    live: InForceDep,
    customer: Annotated[str | None, CustomerQuery] = None,
    since: Annotated[datetime | None, Query(alias="from")] = None,
    until: Annotated[datetime | None, Query(alias="to")] = None,
    status: Annotated[list[str] | None, Query(max_length=len(STATUSES))] = None,
    sender: Annotated[str | None, _Text] = None,
    recipient: Annotated[str | None, _Text] = None,
    message_id: Annotated[str | None, _Text] = None,
    subject: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    cursor: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
) -> JSONResponse:
    """The customer's events, newest first, filtered; ``next`` is the following page's
    cursor (null on the last page). Each status change of a message is its own event;
    ``redaction_by_version`` says how each policy version on the page redacted fields."""
    c = _customer_for(customers, principal, customer)
    lo, hi = time_range(since, until)
    versions = live.versions(customers, c.id)
    text = {"sender": sender, "recipient": recipient, "message_id": message_id}
    flt = _search_filter(c, versions, lo, hi, status, {**text, "subject": subject})
    after = decode_cursor(cursor) if cursor else None
    rows, nxt = store.search_events(c.id, flt, limit, after)
    return JSONResponse(
        {
            "customer": c.id,
            "messages": rows,
            "next": encode_cursor(nxt) if nxt else None,
            "redaction_by_version": _redaction_by_version(versions, rows),
        }
    )


@router.get("/v1/messages/{event_id}")
def message(
    principal: Reader,
    store: StoreDep,
    customers: CustomersDep,
    live: InForceDep,
    event_id: str,
    customer: Annotated[str | None, CustomerQuery] = None,
) -> JSONResponse:
    """One event, its message's status history (oldest first), how it was redacted
    (``stored_redaction``: its version's policy, null if unrecorded) and the policy in force
    (``redaction``)."""
    c = _customer_for(customers, principal, customer)
    try:
        eid = str(uuid.UUID(event_id))
    except ValueError:
        raise HTTPException(404, "no such message") from None
    row = store.get_event(c.id, eid)
    if row is None:
        # Also what another customer's event id gives: nothing says it exists.
        raise HTTPException(404, "no such message")
    mid = row.get("message_id")
    history = store.message_history(c.id, mid) if mid and "***" not in mid else [row]
    versions = live.versions(customers, c.id)
    current = live.records(customers)[c.id]
    return JSONResponse(
        {
            "customer": c.id,
            "message": row,
            "history": history or [row],
            "redaction": redaction_info(current.policy, current.version),
            "stored_redaction": _redaction_by_version(versions, [row]).get(
                str(row.get("policy_version"))
            ),
        }
    )
