"""Dashboard API: filters (HMAC'd fields by clear value), cursor pages stable under
concurrent inserts, customer isolation on every route, errors, and a valid OpenAPI schema."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from openapi_spec_validator import validate

from mailmeta.api import SCOPES
from tests.api_helpers import ApiServer, event


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path_factory.mktemp("dashboard")).start()
    try:
        yield server
    finally:
        server.stop()


def ids(body: dict[str, Any]) -> list[str]:
    return [m["event_id"] for m in body["messages"]]


def test_stored_rows_hold_key_tagged_hashes_and_search_finds_them(api: ApiServer) -> None:
    """The privacy issue's case: a redactor row is ``k1:<hex>``; the sender box must find it."""
    row = event("acme", message_id="<tagged-1@mx.example>")
    assert row.mail_from is not None and row.mail_from.startswith("k1:")
    api.store.insert_events([row])
    with api.client(api.token("acme", "messages:read")) as c:
        r = c.get("/v1/messages", params={"sender": "alice@sender.example"})
        assert r.status_code == 200, r.text
        assert row.event_id in ids(r.json())


def test_masked_fields_cannot_be_searched_exactly_and_say_so(api: ApiServer) -> None:
    row = event("globex", mail_from="carol@sender.example", rcpt_to=["dave@globex.example"])
    assert row.rcpt_to == ["d***@globex.example"]
    api.store.insert_events([row])
    with api.client(api.token("globex", "messages:read")) as c:
        r = c.get("/v1/messages", params={"recipient": "dave@globex.example"})
        assert r.status_code == 400
        assert "rcpt_to is stored as mask" in r.json()["error"]
        # The same customer's kept field is searchable.
        r = c.get("/v1/messages", params={"sender": "carol@sender.example"})
        assert r.status_code == 200, r.text
        assert ids(r.json()) == [row.event_id]


def test_filters_match_clear_values_of_hmac_fields(api: ApiServer) -> None:
    mid = "<filters-1@mx.example>"
    target = event("acme", message_id=mid, subject="Invoice 42 overdue", status="deferred")
    later = event("acme", message_id=mid, status="delivered", age=timedelta(seconds=-1))
    other = event("acme", mail_from=None, rcpt_to=[], subject="Hello", age=timedelta(hours=3))
    api.store.insert_events([target, later, other])
    token = api.token("acme", "messages:read")
    with api.client(token) as c:

        def q(**params: Any) -> set[str]:
            r = c.get("/v1/messages", params={"limit": 1000, **params})
            assert r.status_code == 200, r.text
            return set(ids(r.json()))

        assert {target.event_id, later.event_id} <= q(sender="alice@sender.example")
        assert other.event_id not in q(sender="alice@sender.example")
        assert q(recipient="bob@acme.example") >= {target.event_id}
        assert q(message_id=mid) == {target.event_id, later.event_id}
        assert q(message_id=mid, status="deferred") == {target.event_id}
        assert q(subject="INVOICE 42") == {target.event_id}
        now = datetime.now(UTC)
        assert other.event_id in q(
            **{
                "from": (now - timedelta(hours=4)).isoformat(),
                "to": (now - timedelta(hours=2)).isoformat(),
            }
        )
        assert target.event_id not in q(
            **{
                "from": (now - timedelta(hours=4)).isoformat(),
                "to": (now - timedelta(hours=2)).isoformat(),
            }
        )
        assert q(sender="nobody@sender.example") == set()
        # The detail: the event, its message's status history oldest first, the policy.
        r = c.get(f"/v1/messages/{later.event_id}")
        assert r.status_code == 200
        d = r.json()
        assert d["message"]["status"] == "delivered"
        assert [h["status"] for h in d["history"]] == ["deferred", "delivered"]
        assert d["redaction"]["actions"]["mail_from"] == "hmac"
        assert d["redaction"]["policy_version"] == 3


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 100000},
        {"status": "lost"},
        {"cursor": "!!!"},
        {"cursor": "bm90LWEtY3Vyc29y"},
        {"from": "yesterday"},
        {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        {"sender": "x" * 5000},
    ],
)
def test_bad_parameters_are_400_with_a_json_message(api: ApiServer, params: dict[str, Any]) -> None:
    with api.client(api.token("acme", "messages:read")) as c:
        r = c.get("/v1/messages", params=params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]


def test_subject_filter_refused_where_the_policy_does_not_keep_it(api: ApiServer) -> None:
    with api.client(api.token("globex", "messages:read")) as c:
        r = c.get("/v1/messages", params={"subject": "report"})
    assert r.status_code == 400 and "subject" in r.json()["error"]


def test_pages_are_stable_under_concurrent_inserts(api: ApiServer) -> None:
    mid_prefix = "pg"
    base = [
        event("acme", age=timedelta(minutes=10, milliseconds=i * 7), subject=f"{mid_prefix} {i}")
        for i in range(240)
    ]
    # Same millisecond for some: the event_id breaks the tie.
    base += [
        event("acme", age=timedelta(minutes=20), subject=f"{mid_prefix} tie") for _ in range(10)
    ]
    api.store.insert_events(base)
    stop = threading.Event()

    def writer() -> None:
        # New events, some newer than everything, some in the middle of the paged range.
        i = 0
        while not stop.is_set():
            api.store.insert_events(
                [
                    event("acme", subject=f"{mid_prefix} new"),
                    event(
                        "acme",
                        age=timedelta(minutes=10, milliseconds=3 * i),
                        subject=f"{mid_prefix} mid",
                    ),
                ]
            )
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    seen: list[dict[str, Any]] = []
    try:
        with api.client(api.token("acme", "messages:read")) as c:
            cursor = None
            for _ in range(100):
                params: dict[str, Any] = {"subject": mid_prefix, "limit": 17}
                if cursor:
                    params["cursor"] = cursor
                r = c.get("/v1/messages", params=params)
                assert r.status_code == 200, r.text
                seen += r.json()["messages"]
                cursor = r.json()["next"]
                if cursor is None:
                    break
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    got = [m["event_id"] for m in seen]
    assert len(got) == len(set(got)), "an event appeared on two pages"
    assert {e.event_id for e in base} <= set(got), "an event present before paging was skipped"
    keys = [(m["received_at"], m["event_id"]) for m in seen]
    times = [k[0] for k in keys]
    assert times == sorted(times, reverse=True), "not newest first"


def _routes(api: ApiServer) -> list[tuple[str, str]]:
    """Every documented /v1 route (what the OpenAPI schema lists), as (METHOD, path)."""
    spec = api.app.openapi()
    return [
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        if path.startswith("/v1/")
        for method in ops
    ]


def test_no_route_gives_one_customer_another_customers_data(api: ApiServer) -> None:
    # globex's policy keeps message ids (and drops subjects): the secret is the message id.
    secret_subject = "<globex-confidential-id@mx.example>"
    g = event("globex", message_id=secret_subject)
    api.store.insert_events([g])
    acme_all = api.token("acme", "messages:read", "stats:read", "export")
    values = {"customer": "globex", "event_id": g.event_id, "token_id": "0" * 12}
    routes = _routes(api)
    assert ("GET", "/v1/messages") in routes and ("GET", "/v1/messages/{event_id}") in routes
    with api.client(acme_all) as c:
        for method, path in routes:
            url = re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "globex"), path)
            body = {"customer": "globex", "all": True, "days": 1, "scopes": ["export"]}
            r = c.request(
                method,
                url,
                params={"customer": "globex"},
                json=body if method in ("POST", "PUT", "PATCH") else None,
            )
            if path == "/v1/me":  # about the caller only: ignores customer=
                assert r.status_code == 200 and "globex" not in r.text
                continue
            assert r.status_code in (403, 404), (method, path, r.status_code, r.text)
            assert secret_subject not in r.text and g.event_id not in r.text, (method, path)
        # Without customer=: the token's own customer, never the other one's event.
        r = c.get(f"/v1/messages/{g.event_id}")
        assert r.status_code == 404 and secret_subject not in r.text
        r = c.get("/v1/messages", params={"limit": 1000})
        assert r.status_code == 200 and secret_subject not in r.text
        assert all(m["customer_id"] == "acme" for m in r.json()["messages"])
        me = c.get("/v1/me").json()
        assert [x["id"] for x in me["customers"]] == ["acme"]
    # The operator sees it (so the test above could have failed).
    with api.client(api.operator) as op:
        r = op.get(f"/v1/messages/{g.event_id}", params={"customer": "globex"})
        assert r.status_code == 200 and r.json()["message"]["message_id"] == secret_subject
        assert op.get("/v1/messages").status_code == 400  # operators must name a customer


def test_openapi_schema_is_valid_and_documents_the_routes(api: ApiServer) -> None:
    with api.client(None) as c:
        r = c.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    validate(spec)
    for path in ("/v1/messages", "/v1/messages/{event_id}", "/v1/tokens", "/v1/stats"):
        assert path in spec["paths"], path
    params = {p["name"] for p in spec["paths"]["/v1/messages"]["get"]["parameters"]}
    assert {
        "from",
        "to",
        "status",
        "sender",
        "recipient",
        "message_id",
        "subject",
        "cursor",
    } <= params
    assert SCOPES  # scopes exist for the schema's security description
