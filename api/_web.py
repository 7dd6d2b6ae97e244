"""The static web dashboard: ``/`` and ``/static`` (their headers: ``_headers``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).with_name("web")

web_router = APIRouter()


@web_router.get("/", include_in_schema=False)
def index() -> Response:
    return FileResponse(WEB_DIR / "index.html")


def mount_web(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
