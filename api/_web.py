"""The static web dashboard: ``/`` (with its Content-Security-Policy) and ``/static``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).with_name("web")
# Pages the dashboard's own code may load; nothing from elsewhere, no inline script.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

web_router = APIRouter()


@web_router.get("/", include_in_schema=False)
def index() -> Response:
    return FileResponse(
        WEB_DIR / "index.html",
        headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-store"},
    )


def mount_web(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
