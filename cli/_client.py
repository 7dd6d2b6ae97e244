"""Operator commands reach the running pipeline through its API, never its files.

In embedded mode one process owns the ClickHouse data dir, so reading or changing storage
from the CLI goes through `mailmeta up`'s API: `--api URL` / env MAILMETA_API.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

DEFAULT_API = "http://127.0.0.1:8025"

ApiOption = Annotated[
    str | None,
    typer.Option(
        "--api",
        help=f"URL of the running pipeline's API (env MAILMETA_API, default {DEFAULT_API}).",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="API bearer token (env MAILMETA_TOKEN; else the operator-token file of "
        "`mailmeta up` in MAILMETA_DATA_DIR or ./.mailmeta).",
        show_default=False,
    ),
]


def api_url(value: str | None) -> str:
    """The API's base URL, or a one-line error naming what is wrong with it."""
    url = (value or os.environ.get("MAILMETA_API") or DEFAULT_API).rstrip("/")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        fail(f"--api / MAILMETA_API: {url!r} is not a valid URL: {exc}", 2)
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.host
        or not 0 < (parsed.port or 80) < 65536
    ):
        fail(f"--api / MAILMETA_API: {url!r} is not an http(s)://HOST[:PORT] URL", 2)
    return url


def operator_token() -> str | None:
    """The token `mailmeta up` wrote for the local operator, if there is one to read."""
    data_dir = os.environ.get("MAILMETA_DATA_DIR")
    path = Path(data_dir) / "operator-token" if data_dir else Path(".mailmeta/operator-token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class ApiClient:
    """A thin httpx client: errors become one clear CLI message and exit code 1."""

    def __init__(self, api: str | None, token: str | None = None, timeout: float = 60.0) -> None:
        self.base = api_url(api)
        token = token or os.environ.get("MAILMETA_TOKEN") or operator_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            fail(
                f"cannot reach the mailmeta API at {self.base} (is `mailmeta up` running? --api URL)"
            )
        except httpx.HTTPError as exc:
            fail(f"request to {self.base}{path} failed: {exc}")
        if r.status_code >= 400:
            try:
                body = r.json()
                message = body.get("error") or body.get("detail") or r.text
                problems = body.get("problems")
            except ValueError:
                message, problems = r.text, None
            detail = ""
            if problems:
                detail = "".join(
                    f"\n  {p.get('param') or p.get('field')}: {p.get('problem')}" for p in problems
                )
            fail(f"{r.status_code}: {message}{detail}")
        return r

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"mailmeta: {message}", err=True)
    raise typer.Exit(code)
