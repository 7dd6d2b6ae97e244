"""The API's Prometheus metrics, scraped over HTTP: requests by route template and status,
latency, 429s by limit, token failures by reason — and no customer id, event id or query
value in any label. Served from the process's registry, on the port the service serves the
sink's metrics on (MAILMETA_SINK_METRICS_PORT)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mailmeta.api import RateLimiter
from mailmeta.config import Settings, load_customers
from mailmeta.local.apache_kafka import KafkaNode
from mailmeta.local.brokers import LocalBroker
from mailmeta.local.process import free_port
from mailmeta.service import SinkService
from mailmeta.sinks import serve_metrics
from tests.api_helpers import ApiServer, event
from tests.metrics_helpers import Samples, scrape, value


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    with ApiServer(tmp_path) as server:
        yield server


@pytest.fixture
def metrics_url() -> Iterator[str]:
    port = free_port()
    server, _ = serve_metrics(port, "127.0.0.1")  # what the service starts
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def api_label_values(url: str) -> set[str]:
    """Every label value of the API's series, as Prometheus stores them."""
    return {
        v for (name, labels) in scrape(url) if name.startswith("mailmeta_api_") for _, v in labels
    }


def test_api_metrics_count_routes_statuses_latency_429s_and_token_failures(
    api: ApiServer, metrics_url: str
) -> None:
    row = event("acme")
    api.store.insert_events([row])
    reader = api.token("acme", "messages:read")
    before = scrape(metrics_url)

    with api.client(reader) as c:
        assert (
            c.get("/v1/messages", params={"customer": "acme", "q": "secret-q"}).status_code == 200
        )
        assert c.get(f"/v1/messages/{row.event_id}").status_code == 200
        assert c.get("/v1/no-such-route/acme").status_code == 404
    for token, reason in (
        (None, "missing"),
        ("not-a-token", "malformed"),
        ("mm_000000000000_" + "A" * 43, "invalid"),
    ):
        with api.client(token) as c:
            assert c.get("/v1/messages", params={"customer": "acme"}).status_code == 401, reason
    api.auth.limiter = RateLimiter(rate=0.01, burst=1)
    with api.client(reader) as c:
        codes = [c.get("/v1/me").status_code for _ in range(2)]
    assert codes == [200, 429]

    after = scrape(metrics_url)
    requests = "mailmeta_api_requests_total"
    get = {"method": "GET"}
    assert moved(before, after, requests, route="/v1/messages", status="200", **get) == 1
    assert moved(before, after, requests, route="/v1/messages", status="401", **get) == 3
    assert moved(before, after, requests, route="/v1/messages/{event_id}", status="200", **get) == 1
    assert moved(before, after, requests, route="(no route)", status="404", **get) == 1
    assert moved(before, after, requests, route="/v1/me", status="429", **get) == 1
    assert moved(before, after, requests, route="/v1/tokens", status="201", method="POST") == 0
    seconds = "mailmeta_api_request_seconds"
    assert moved(before, after, f"{seconds}_count", route="/v1/messages", **get) == 4
    assert moved(before, after, f"{seconds}_sum", route="/v1/messages", **get) > 0
    assert moved(before, after, f"{seconds}_bucket", route="/v1/me", le="+Inf", **get) == 2
    for reason in ("missing", "malformed", "invalid"):
        assert moved(before, after, "mailmeta_api_token_failures_total", reason=reason) == 1
    assert moved(before, after, "mailmeta_api_rate_limited_total", limit="token") == 1
    assert moved(before, after, "mailmeta_api_rate_limited_total", limit="failures") == 0

    # Route templates, never paths: no customer, event id or query value becomes a label.
    labels = api_label_values(metrics_url)
    assert "/v1/messages/{event_id}" in labels
    for leaked in ("acme", str(row.event_id), "secret-q", "/v1/no-such-route/acme"):
        assert not any(leaked in v for v in labels), leaked


def test_failed_authentications_over_budget_count_as_429s(api: ApiServer, metrics_url: str) -> None:
    api.auth.failures = RateLimiter(rate=0.01, burst=2)
    before = scrape(metrics_url)
    with api.client("mm_000000000000_" + "B" * 43) as c:
        codes = [c.get("/v1/me").status_code for _ in range(4)]
    assert codes == [401, 401, 429, 429]
    after = scrape(metrics_url)
    assert moved(before, after, "mailmeta_api_rate_limited_total", limit="failures") == 2
    # The 429s are answered before any token check (no argon2 for an address over budget).
    assert moved(before, after, "mailmeta_api_token_failures_total", reason="invalid") == 2


def test_the_service_serves_the_api_metrics_on_its_metrics_port(
    broker: LocalBroker | KafkaNode, settings: Settings
) -> None:
    """As deployed: one process, the API on its port (tokens), /metrics on the sink's."""
    s = settings.model_copy(update={"sink_metrics_port": free_port()})
    with SinkService(s, load_customers(s.config, s.region)) as service:
        before = scrape(service.metrics_url)
        assert httpx.get(f"{service.url}/v1/me", timeout=10).status_code == 401
        after = scrape(service.metrics_url)
    route = {"method": "GET", "route": "/v1/me", "status": "401"}
    assert moved(before, after, "mailmeta_api_requests_total", **route) == 1
    assert moved(before, after, "mailmeta_api_token_failures_total", reason="missing") == 1
