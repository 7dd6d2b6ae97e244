"""The query API, served from the process that owns the store (DESIGN.md: one chdb owner)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailmeta.api._auth import AccessLogMiddleware, TokenAuthority
from mailmeta.api._dashboard import dashboard_router, mount_web
from mailmeta.api._storage import storage_router
from mailmeta.api._tokens import tokens_router
from mailmeta.config import Customers
from mailmeta.store import Store, StoreError

log = logging.getLogger("mailmeta.api")


class DrainStatus(Protocol):
    """What the sink reports about a drain request (``mailmeta.sinks.DrainState``)."""

    def status(self, nonce: str) -> dict[str, object]: ...


# RFC 5322 lines are at most 998 octets: a longer message id cannot match anything.
_MAX_MESSAGE_ID = 998


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def create_api(
    store: Store,
    customers: Customers,
    drain_state: DrainStatus,
    health: Callable[[], dict[str, Any]] | None = None,
    auth: TokenAuthority | None = None,
) -> FastAPI:
    """The FastAPI app. ``health`` adds parts (e.g. the consumer's state) to /healthz;
    ``auth`` turns bearer tokens on (None: every caller is the local operator)."""
    app = FastAPI(
        title="mailmeta query API", docs_url=None, redoc_url=None, openapi_url="/openapi.json"
    )
    app.state.token_authority = auth
    app.add_middleware(AccessLogMiddleware)

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
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})  # Retry-After, WWW-Authenticate
        return response

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

    # /v1/messages (filters, cursor pages), /v1/messages/{id}, /v1/me and the web page.
    app.include_router(dashboard_router(store, customers))
    app.include_router(tokens_router(store, customers))
    mount_web(app)
    app.include_router(storage_router(store, customers))

    @app.get("/internal/drain/{nonce}")
    def drain(nonce: str) -> dict[str, object]:
        return drain_state.status(nonce)

    return app
