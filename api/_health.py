"""Liveness for orchestrators (/healthz) and the sink's drain status (/internal/drain).

The drain status is for the operator's tooling (``mailmeta up`` asks it while stopping):
it is served on the API's port, so it takes the operator token like token management."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Protocol, cast

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from mailmeta.api._deps import StoreDep
from mailmeta.api._principals import Principal, require_operator


class DrainStatus(Protocol):
    """What the sink reports about a drain request (``mailmeta.sinks.DrainState``)."""

    def status(self, nonce: str) -> dict[str, object]: ...


Health = Callable[[], dict[str, Any]]

health_router = APIRouter()
drain_router = APIRouter()


@health_router.get("/healthz")
def healthz(request: Request, store: StoreDep) -> JSONResponse:
    health = cast("Health | None", request.app.state.health)
    parts: dict[str, Any] = dict(health() if health else {})
    ok = store.ping()
    parts["clickhouse"] = "ok" if ok else "unreachable"
    ok = ok and parts.get("consumer", {}).get("state") not in ("failed", "stopped")
    return JSONResponse({"status": "ok" if ok else "degraded", **parts}, 200 if ok else 503)


@drain_router.get("/internal/drain/{nonce}")
def drain(
    nonce: str, request: Request, _p: Annotated[Principal, Depends(require_operator)]
) -> dict[str, object]:
    return cast(DrainStatus, request.app.state.drain_state).status(nonce)
