"""Region pinning in the query API (issue 17.4): each region's API, over its own store, answers
only for its own region's customers. Every route about one customer asked about a customer
pinned to another region answers 421 naming that region (never a redirect: tokens are per
region), with no data and without touching the store or the policies topic.

Both directions run: the "eu" API asked about a default-region customer, and the default
API asked about the eu customer. Each store also holds a row of the other region's customer
(as a store would that served it before it was pinned elsewhere), so an API that answered
from its store would show it. Rows are raw events redacted by the real redactor of the
customer's region and inserted through the store, as the sink inserts them. The policy routes
run on a real broker's (regional) policies topic, as in the sink.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from mailmeta.config import Customers, Settings, load_customers
from mailmeta.kafka import ensure_topics
from mailmeta.local.apache_kafka import KafkaNode
from mailmeta.local.brokers import LocalBroker
from mailmeta.policy import PolicyLog
from mailmeta.schema import Event
from tests.api_helpers import ApiServer, per_table
from tests.event_helpers import Redacted

EU_API = "https://eu.api.example"
FILE = {
    "regions": {"eu": {"api_url": EU_API, "smtp_host": "mx.eu.example"}},
    "customers": [
        {
            "id": "acme",
            "region": "eu",
            "domains": ["acme.example"],
            "retention_days": 60,
            "hmac_key": "acme-test-hmac-key-0123456789abcdef",
            "policy": {"subject": "keep", "message_id": "keep", "mail_from": "hmac"},
        },
        {
            "id": "globex",
            "domains": ["globex.example"],
            "retention_days": 90,
            "policy": {"subject": "keep", "message_id": "keep", "mail_from": "keep"},
        },
    ],
}
OWN = {"eu": "acme", "default": "globex"}
OTHER = {"eu": "globex", "default": "acme"}
REGION_OF = {"acme": "eu", "globex": "default"}
# What each API tells a client who asked about the other region's customer.
TOLD = {
    "eu": ("customer 'globex' is served in region 'default'; ask that region's API", None),
    "default": (
        f"customer 'acme' is served in region 'eu' ({EU_API}, mx.eu.example); "
        "ask that region's API",
        EU_API,
    ),
}
# Every route about one customer (from a parameter, the path or the body; /v1/me about the
# token's own): each must document 421 and answer it for another region's customer.
CUSTOMER_ROUTES = {
    ("GET", "/v1/me"),
    ("GET", "/v1/messages"),
    ("GET", "/v1/messages/{event_id}"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/export"),
    ("POST", "/v1/erase"),
    ("PUT", "/v1/retention/{customer}"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/policies/{customer}"),
    ("PUT", "/v1/policies/{customer}"),
    ("POST", "/v1/policies/validate"),
    ("POST", "/v1/policies/{customer}/preview"),
    ("GET", "/v1/policies/{customer}/audit"),
    ("GET", "/v1/webhooks"),
    ("POST", "/v1/webhooks"),
}
# Valid requests: a 421 must not be a validation error's 400 in disguise.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/erase"): {"all": True},
    ("PUT", "/v1/retention/{customer}"): {"days": 1},
    ("POST", "/v1/tokens"): {"name": "x", "scopes": ["messages:read"]},
    ("PUT", "/v1/policies/{customer}"): {
        "policy": {"subject": "drop", "message_id": "drop"},
        "apply_to_stored": True,
    },
    ("POST", "/v1/policies/validate"): {"policy": {"subject": "drop"}},
    ("POST", "/v1/policies/{customer}/preview"): {"policy": {"subject": "drop"}, "sample": 5},
    ("POST", "/v1/webhooks"): {"url": "https://hooks.example/mail"},
}
# Of those, what a customer's own token may ask (its customer named by the token).
READER_ROUTES = ["/v1/me", "/v1/messages", "/v1/messages/{event_id}", "/v1/stats", "/v1/export"]


def _event(customers: Customers, customer: str, secret: str) -> Event:
    """A raw event redacted by the real redactor of the customer's own region."""
    return Redacted(customers)(customer, message_id=f"<{secret}@mx.example>", subject=secret)


class Region:
    """One region's API (its own store, tokens and policies topic) and what it stores."""

    def __init__(self, api: ApiServer, settings: Settings, region: str) -> None:
        self.api, self.settings, self.region = api, settings, region
        self.own, self.other = OWN[region], OTHER[region]
        self.secret = {c: f"secret-{c}-{uuid.uuid4().hex}" for c in (self.own, self.other)}
        self.other_event_id = ""


@pytest.fixture
def cell(region: str, broker: LocalBroker | KafkaNode, tmp_path: Path) -> Iterator[Region]:
    path = tmp_path / "customers.yaml"
    path.write_text(yaml.safe_dump(FILE), encoding="utf-8")
    customers = load_customers(path, region)  # as the region's service loads them
    prefix = f"regions-{region}-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        config=path,
        region=region,
        data_dir=tmp_path / "data",
        kafka_bootstrap=broker.bootstrap,
        raw_topic=f"{prefix}.raw",
        redacted_topic=f"{prefix}.redacted",
        deadletter_topic=f"{prefix}.deadletter",
        policies_topic=f"{prefix}.policies",
    )
    ensure_topics(settings, customers.shortest_retention_days)
    api = ApiServer(tmp_path, customers=customers)
    api.install_policies(settings, customers)
    cell = Region(api, settings, region)
    own = [_event(customers, cell.own, cell.secret[cell.own]) for _ in range(2)]
    # The other customer's row, redacted by its own region's redactor.
    elsewhere = customers.serving(customers.by_id[cell.other].region)
    foreign = _event(elsewhere, cell.other, cell.secret[cell.other])
    cell.other_event_id = foreign.event_id
    api.store.insert_events([*own, foreign])
    api.start()
    try:
        yield cell
    finally:
        api.stop()


def _ask(c: httpx.Client, cell: Region, method: str, path: str) -> httpx.Response:
    values = {"customer": cell.other, "event_id": cell.other_event_id}
    url = re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)
    body = BODIES.get((method, path))
    if body is not None and "{customer}" not in path:
        body = {**body, "customer": cell.other}
    return c.request(method, url, params={"customer": cell.other}, json=body)


def _misdirected(cell: Region, r: httpx.Response, what: str) -> None:
    message, api_url = TOLD[cell.region]
    assert r.status_code == 421, (what, r.status_code, r.text)
    assert r.json() == {"error": message, "region": REGION_OF[cell.other], "api_url": api_url}
    assert "location" not in r.headers, what  # not a redirect: the token is this region's
    assert cell.secret[cell.other] not in r.text, what


def _check_own_customer_is_served(cell: Region) -> None:
    api, own = cell.api, cell.own
    with api.client(api.operator) as op:
        me = op.get("/v1/me").json()
        assert me["region"] == cell.region and [c["id"] for c in me["customers"]] == [own]
        # Listings of one region's API show that region's customers only.
        assert list(op.get("/v1/retention").json()["retention_days"]) == [own]
        assert [p["customer_id"] for p in op.get("/v1/policies").json()["policies"]] == [own]
        rows = op.get("/v1/messages", params={"customer": own}).json()["messages"]
        assert [r["subject"] for r in rows] == [cell.secret[own]] * 2
    reader = api.token(own, "messages:read", "stats:read", "export")
    with api.client(reader) as c:
        assert len(c.get("/v1/messages").json()["messages"]) == 2
        stats = c.get("/v1/stats", params={"customer": own}).json()
        assert stats["totals"]["delivered"]["messages"] == 2
        export = c.get("/v1/export", params={"customer": own}).text
        assert cell.secret[own] in export and cell.secret[cell.other] not in export


@pytest.mark.parametrize("broker", ["tansu"], indirect=True)
@pytest.mark.parametrize("region", ["eu", "default"])
def test_a_region_answers_only_for_its_own_customers(cell: Region) -> None:
    api = cell.api
    _check_own_customer_is_served(cell)
    # Each region's policies topic holds its own customers' policies only.
    assert set(PolicyLog(cell.settings).read_all()) == {cell.own}

    spec = api.app.openapi()
    documented = {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if "421" in op["responses"]
    }
    assert documented == CUSTOMER_ROUTES

    # A token of that customer made here before it was pinned elsewhere: refused too.
    scopes = ["messages:read", "stats:read", "export"]
    _, stale = api.auth.create("before-pinning", cell.other, scopes)
    before = per_table(api, cell.other)
    assert before["messages"] == 1  # the row an API answering from its store would show
    with api.client(api.operator) as op:
        for method, path in sorted(CUSTOMER_ROUTES - {("GET", "/v1/me")}):
            _misdirected(cell, _ask(op, cell, method, path), f"operator {method} {path}")
    with api.client(stale) as c:
        for path in READER_ROUTES:
            _misdirected(cell, _ask(c, cell, "GET", path), f"customer token GET {path}")

    # Nothing was read into an answer, written, erased, audited or published for it.
    assert per_table(api, cell.other) == before
    assert set(PolicyLog(cell.settings).read_all()) == {cell.own}
