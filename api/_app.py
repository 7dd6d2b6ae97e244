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


_ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What went wrong, for a person."},
        "problems": {
            "type": "array",
            "description": "Validation errors only: each bad parameter and the rule it broke"
            " (the value is never echoed).",
            "items": {
                "type": "object",
                "required": ["param", "problem"],
                "properties": {"param": {"type": "string"}, "problem": {"type": "string"}},
            },
        },
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}}
_ERRORS = {
    "400": "Invalid parameters or body (problems name each), or a request that cannot be"
    " answered as asked (e.g. an operator token without 'customer').",
    "401": "Missing, malformed, unknown or revoked API token.",
    "403": "The token lacks the scope, or may not see that customer.",
    "404": "Unknown customer, or no such item.",
    "409": "API tokens are off on this deployment.",
    "429": "Rate limit: this token's, or this client address's failed authentications.",
    "500": "The customer's HMAC keys cannot be read; nothing was changed.",
    "503": "Storage unavailable.",
}
_CUSTOMER_DOC = (
    "The customer asked about. A customer token may omit it (its own customer) or name its own"
    " (another: 403). An operator token must name one: 400 without it, 404 if unknown."
)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, made to say what the handlers really answer: validation errors
    are 400 with the ``Error`` body (not 422), and every /v1 operation documents the
    errors its auth, its lookups and the store can give."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Error"] = _ERROR_SCHEMA
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            responses = op["responses"]
            params = op.get("parameters", [])
            for param in params:
                if param["name"] == "customer" and param["in"] == "query":
                    param["description"] = _CUSTOMER_DOC
            codes: set[str] = set()
            if responses.pop("422", None) is not None or params or "requestBody" in op:
                codes.add("400")
            if path.startswith("/v1/"):
                codes |= {"401", "403", "429", "503"}
                if params or "requestBody" in op:
                    codes.add("404")
                if path.startswith("/v1/tokens"):
                    codes.add("409")
                if (method, path) == ("post", "/v1/erase"):
                    codes.add("500")
            elif path == "/healthz":
                codes.add("503")
            for code in sorted(codes):
                response: dict[str, Any] = {
                    "description": _ERRORS[code],
                    "content": {"application/json": {"schema": _ERROR_REF}},
                }
                if code == "429":
                    response["headers"] = _RETRY_AFTER
                responses.setdefault(code, response)
    app.openapi_schema = doc
    return doc


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
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

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
