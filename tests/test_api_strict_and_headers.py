"""Request bodies are strictly typed, and every response carries the security headers
(issue 21), over HTTP against the API served as the service serves it.

The strict-typing test finds the numeric fields of every request body in the OpenAPI
document, so a numeric field added later is covered without touching this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailmeta.config import Settings
from tests.api_helpers import CUSTOMERS, ApiServer

# What "true", "2" and 2.0 became before: 1, 2 and 2 (lax coercion).
NOT_INTEGERS: list[Any] = [True, "2", 2.0]


def _schema(doc: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    ref = s.get("$ref")
    return _schema(doc, doc["components"]["schemas"][ref.rsplit("/", 1)[1]]) if ref else s


def _is_number(s: dict[str, Any]) -> bool:
    kinds = {s.get("type")} | {alt.get("type") for alt in s.get("anyOf", [])}
    return bool(kinds & {"integer", "number"})


def numeric_body_fields(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(method, path, field) for every integer or number property of a JSON request body."""
    out = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            content = op.get("requestBody", {}).get("content", {}).get("application/json")
            if content is None:
                continue
            body = _schema(doc, content["schema"])
            for name, prop in body.get("properties", {}).items():
                if _is_number(_schema(doc, prop)):
                    out.append((method.upper(), path, name))
    return out


def _problems(r: httpx.Response) -> set[str]:
    return {p["param"] for p in r.json().get("problems", [])} if r.status_code == 400 else set()


@pytest.fixture
def policy_api(settings: Settings, tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path)
    server.install_policies(settings, CUSTOMERS)  # the policy routes, as the service has them
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.kafka
@pytest.mark.parametrize("broker", ["kafka"], indirect=True)
def test_every_numeric_body_field_refuses_bools_strings_and_floats(
    policy_api: ApiServer,
) -> None:
    with policy_api.client(policy_api.operator) as c:
        fields = numeric_body_fields(c.get("/openapi.json").json())
        # The enumeration sees the fields known today (and any added later).
        assert {f for _, _, f in fields} >= {"days", "expected_version", "sample"}, fields
        accepted = []
        for method, path, field in fields:
            url = path.replace("{customer}", "acme")
            # The control: an integer is no problem for this field.
            ok = c.request(method, url, json={field: 2})
            assert field not in _problems(ok), (method, path, field, ok.text)
            for bad in NOT_INTEGERS:
                r = c.request(method, url, json={field: bad})
                if r.status_code != 400 or field not in _problems(r):
                    accepted.append((method, path, field, bad, r.status_code))
    assert not accepted, accepted


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def test_every_response_of_the_web_app_and_the_api_carries_the_headers(api: ApiServer) -> None:
    token = api.token("acme", "messages:read")
    with api.client(token) as c:
        responses = {
            path: c.get(path)
            for path in (
                "/",
                "/static/index.html",
                "/static/app.js",
                "/static/policy.js",
                "/static/style.css",
                "/static/missing.js",
                "/v1/messages",
                "/v1/me",
            )
        }
        # A conditional request for a static file (a 304 has no body, but the headers).
        etag = responses["/static/app.js"].headers["etag"]
        responses["304"] = c.get("/static/app.js", headers={"If-None-Match": etag})
    with api.client(None) as anonymous:
        responses["401"] = anonymous.get("/v1/messages", params={"customer": "acme"})
    assert responses["/static/index.html"].status_code == 200
    assert responses["/static/missing.js"].status_code == 404
    assert responses["/v1/messages"].status_code == 200
    assert responses["304"].status_code == 304
    assert responses["401"].status_code == 401
    for what, r in responses.items():
        h = r.headers
        assert h.get("cache-control") == "no-store", what
        assert h.get("x-content-type-options") == "nosniff", what
        assert "frame-ancestors 'none'" in h.get("content-security-policy", ""), what
        assert "script-src 'self'" in h["content-security-policy"], what
        assert h.get("x-frame-options") == "DENY", what
        assert h.get("referrer-policy") == "no-referrer", what
