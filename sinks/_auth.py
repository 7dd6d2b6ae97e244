"""Who is calling the API: the seam every route's access check goes through.

Routes declare what they need with ``Depends(require("scope"))`` and check customers with
``principal.check_customer(id)``. Until API tokens exist, the API listens on loopback only
and every caller is the local operator (all scopes, all customers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException, Request

SCOPES = frozenset({"messages:read", "stats:read", "export", "admin"})


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    scopes: frozenset[str]
    customer: str | None  # None: every customer (operators)

    def check_customer(self, customer: str) -> None:
        """403 unless this caller may see ``customer``'s data."""
        if self.customer is not None and self.customer != customer:
            raise HTTPException(403, "this token is not allowed to access that customer")


LOCAL_OPERATOR = Principal("local-operator", SCOPES, None)


def current_principal(request: Request) -> Principal:
    return LOCAL_OPERATOR


def require(scope: str) -> Callable[[Request], Principal]:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def dependency(request: Request) -> Principal:
        principal = current_principal(request)
        if scope not in principal.scopes and "admin" not in principal.scopes:
            raise HTTPException(403, f"this token lacks the {scope!r} scope")
        return principal

    return dependency
