"""Every error is JSON ``{"error": ..., "problems"?: [...]}``: validation errors are 400 naming
each parameter and rule (never the value), storage failures 503, a customer of another region
421 with that ``region`` and its ``api_url``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailmeta.store import StoreError

log = logging.getLogger("mailmeta.api")


class Misdirected(HTTPException):
    """421: the customer is pinned to another region, whose own API (and own tokens) serve it.
    Not a redirect: following one would send this region's bearer token to another host."""

    def __init__(self, message: str, region: str, api_url: str | None) -> None:
        super().__init__(421, message)
        self.region = region
        self.api_url = api_url


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


async def _invalid(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Name the parameter and the rule; never echo the value back.
    problems = [
        {"param": ".".join(str(p) for p in e.get("loc", ())[1:]), "problem": e.get("msg", "")}
        for e in exc.errors()
    ]
    return error(400, "invalid request parameters", problems=problems)


async def _http(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    extra = {"region": exc.region, "api_url": exc.api_url} if isinstance(exc, Misdirected) else {}
    response = error(exc.status_code, str(exc.detail), **extra)
    response.headers.update(exc.headers or {})  # Retry-After, WWW-Authenticate
    return response


async def _store_down(_request: Request, exc: Exception) -> JSONResponse:
    log.error("storage error: %s", exc)
    return error(503, "storage unavailable")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(StoreError, _store_down)
