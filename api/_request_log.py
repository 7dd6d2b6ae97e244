"""ASGI middleware that records every answered request: its metrics (all routes) and, for
``/v1`` with tokens on, an access-log record. Only the route template, method, status,
latency and token id are read: never the query string, body, or the path itself."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from starlette.types import Message, Receive, Scope, Send

from mailmeta.api import _metrics as metrics
from mailmeta.api._asgi import HttpMiddleware
from mailmeta.api._token_authority import TokenAuthority
from mailmeta.store import AccessRecord


class RequestLogMiddleware(HttpMiddleware):
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            seconds = time.perf_counter() - start
            method, route = str(scope.get("method", "")), _route_template(scope)
            metrics.observe(method, route, status, seconds)
            authority = _authority(scope)
            if authority is not None and str(scope.get("path", "")).startswith("/v1/"):
                state = scope.get("state") or {}
                authority.access.add(
                    AccessRecord(
                        at=datetime.now(UTC),
                        token_id=str(state.get("token_id") or ""),
                        method=method,
                        route=route,
                        status=status,
                        latency_ms=seconds * 1000,
                    )
                )


def _route_template(scope: Scope) -> str:
    """The matched route's template (/v1/messages/{event_id}), set in the scope by the
    router; NO_ROUTE when none matched."""
    path = getattr(scope.get("route"), "path", "")
    return path if isinstance(path, str) and path else metrics.NO_ROUTE


def _authority(scope: Scope) -> TokenAuthority | None:
    """The app's token authority (None with tokens off): read per request, as routes do."""
    state = getattr(scope.get("app"), "state", None)
    authority = getattr(state, "token_authority", None)
    return authority if isinstance(authority, TokenAuthority) else None
