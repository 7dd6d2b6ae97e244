"""The query API, served from the process that owns the store (DESIGN.md: one chdb owner)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailmeta.config import Customers
from mailmeta.sinks._auth import Principal, require
from mailmeta.sinks._drain import DrainState
from mailmeta.sinks.store import MAX_LIMIT, Store, StoreError

log = logging.getLogger("mailmeta.sinks.api")

# RFC 5322 lines are at most 998 octets: a longer message id cannot match anything.
_MAX_MESSAGE_ID = 998


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def create_api(
    store: Store,
    customers: Customers,
    drain_state: DrainState,
    health: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """The FastAPI app. ``health`` adds parts (e.g. the consumer's state) to /healthz."""
    app = FastAPI(title="mailmeta query API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Name the parameter and the rule; never echo the value back.
        problems = [
            {"param": ".".join(str(p) for p in e.get("loc", ())[1:]), "problem": e.get("msg", "")}
            for e in exc.errors()
        ]
        return _error(400, "invalid request parameters", problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(StoreError)
    async def _store_down(_request: Request, exc: StoreError) -> JSONResponse:
        log.error("storage error: %s", exc)
        return _error(503, "storage unavailable")

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        parts: dict[str, Any] = dict(health() if health else {})
        ok = store.ping()
        parts["clickhouse"] = "ok" if ok else "unreachable"
        ok = ok and parts.get("consumer", {}).get("state") not in ("failed", "stopped")
        return JSONResponse({"status": "ok" if ok else "degraded", **parts}, 200 if ok else 503)

    @app.get("/v1/messages")
    def messages(
        principal: Annotated[Principal, Depends(require("messages:read"))],
        customer: Annotated[str, Query(min_length=1, max_length=64)],
        message_id: Annotated[str | None, Query(min_length=1, max_length=_MAX_MESSAGE_ID)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    ) -> JSONResponse:
        principal.check_customer(customer)
        if customer not in customers.by_id:
            return _error(404, "unknown customer")
        rows = store.query_messages(customer, message_id=message_id, limit=limit)
        return JSONResponse({"messages": rows})

    @app.get("/internal/drain/{nonce}")
    def drain(nonce: str) -> dict[str, object]:
        return drain_state.status(nonce)

    return app
