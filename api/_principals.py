"""Who is calling the API, and the seam every route's access check goes through.

Routes declare what they need with ``Depends(require("scope"))`` and check customers with
``principal.check_customer(id)``. With ``api_auth`` off (no TokenAuthority on the app) every
caller is the local operator (all scopes, all customers); with it on, every request carries
``Authorization: Bearer mm_<id>_<secret>``, checked by the app's ``TokenAuthority``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import HTTPException, Request

if TYPE_CHECKING:  # the authority builds principals: a type-only import back
    from mailmeta.api._token_authority import TokenAuthority

SCOPES = frozenset({"messages:read", "stats:read", "export", "admin", "webhooks"})


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    scopes: frozenset[str]
    customer: str | None  # None: every customer (operators)
    token_id: str | None = None

    def check_customer(self, customer: str) -> None:
        """403 unless this caller may see ``customer``'s data."""
        if self.customer is not None and self.customer != customer:
            raise HTTPException(403, "this token is not allowed to access that customer")

    def customer_or(self, customer: str | None) -> str:
        """The customer a request is about: the token's own when it names none."""
        if customer is None:
            if self.customer is None:
                raise HTTPException(400, "'customer' is required for operator tokens")
            return self.customer
        self.check_customer(customer)
        return customer


LOCAL_OPERATOR = Principal("local-operator", SCOPES, None)


def authority_of(request: Request) -> TokenAuthority | None:
    """The app's token authority; None when tokens are off (``api_auth=false``)."""
    authority: TokenAuthority | None = getattr(request.app.state, "token_authority", None)
    return authority


def current_principal(request: Request) -> Principal:
    cached: Principal | None = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    authority = authority_of(request)
    principal = LOCAL_OPERATOR if authority is None else authority.authenticate(request)
    request.state.principal = principal
    return principal


def require(scope: str) -> Callable[[Request], Principal]:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def dependency(request: Request) -> Principal:
        principal = current_principal(request)
        if scope not in principal.scopes and "admin" not in principal.scopes:
            raise HTTPException(403, f"this token lacks the {scope!r} scope")
        return principal

    return dependency


def require_operator(request: Request) -> Principal:
    """Admin over every customer: token management."""
    principal = require("admin")(request)
    if principal.customer is not None:
        raise HTTPException(403, "only operator tokens (all customers) may do this")
    return principal
