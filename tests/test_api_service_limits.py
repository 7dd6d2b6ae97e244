"""The API of a real ``python -m mailmeta.service`` process, over HTTP (issue 21):

- X-Forwarded-For is believed only from MAILMETA_API_TRUSTED_PROXIES (default: none), so a
  client cannot reset its failed-login limit by naming a new address per guess;
- /internal/drain on the public port needs the operator token;
- concurrent exports are bounded per customer and in all (429 with Retry-After), and the
  service's RSS stays within a stated bound while many clients export at once.

Rows are raw events through the real redactor, produced to the redacted topic and stored by
the service's own sink, as in production.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from mailmeta.config import Settings, load_customers
from mailmeta.kafka import ensure_topics
from mailmeta.schema import encode_event
from tests.event_helpers import Redacted
from tests.kafka_helpers import produce, settings_env, wait_until
from tests.test_sink_process import SinkProcess, sink_process

# The broker is incidental here: Apache Kafka only.
pytestmark = [pytest.mark.kafka, pytest.mark.parametrize("broker", ["kafka"], indirect=True)]

# Two customers, so the per-customer and the total bound can both be reached.
CUSTOMERS_YAML = """
customers:
  - id: north
    domains: [north.example]
    retention_days: 60
    policy: {subject: keep, message_id: keep, smtp_reply: keep, size_bytes: keep}
  - id: south
    domains: [south.example]
    retention_days: 60
    policy: {subject: keep, message_id: keep, smtp_reply: keep, size_bytes: keep}
"""
ROWS_PER_CUSTOMER = 10_000
# The bound README states: with the default export limits, 20 clients exporting at once (10
# per customer, 10,000 rows each), four rounds, grow the service by less than this over its
# RSS after one export. Measured on 2 cores: +137..165 MiB with the limits, +416 without.
CLIENTS = 20
RSS_GROWTH_BOUND_MIB = 250


@pytest.fixture
def cfg(settings: Settings, tmp_path: Path) -> Settings:
    path = tmp_path / "customers.yaml"
    path.write_text(CUSTOMERS_YAML)
    s = settings.model_copy(update={"config": path})
    ensure_topics(s, load_customers(path).shortest_retention_days)
    return s


def operator(s: Settings) -> dict[str, str]:
    assert s.operator_token_file is not None  # the service writes it on start
    return {"Authorization": f"Bearer {s.operator_token_file.read_text().strip()}"}


def url(s: Settings) -> str:
    return f"http://{s.api_host}:{s.api_port}"


def refusals(s: Settings, n: int) -> list[int]:
    """``n`` requests with a bad token, each naming a different X-Forwarded-For."""
    with httpx.Client(base_url=url(s), timeout=10) as c:
        return [
            c.get(
                "/v1/me",
                headers={
                    "Authorization": "Bearer mm_not-a-token",
                    "X-Forwarded-For": f"203.0.113.{i % 250 + 1}",
                },
            ).status_code
            for i in range(n)
        ]


def test_forwarded_for_counts_only_from_trusted_proxies(cfg: Settings, tmp_path: Path) -> None:
    # Default: no proxy trusted, not even loopback; the limit counts the real peer.
    with sink_process(settings_env(cfg), tmp_path / "default.log"):
        codes = refusals(cfg, 50)
    assert codes.count(429) >= 10, codes  # burst 30, refilled at 1/s
    assert set(codes) == {401, 429}
    assert codes.index(429) >= 30  # the first 30 failures are answered 401
    # A trusted proxy network: the forwarded address is the client's, each one new here.
    env = dict(settings_env(cfg), MAILMETA_API_TRUSTED_PROXIES="127.0.0.0/8, ::1")
    with sink_process(env, tmp_path / "trusted.log"):
        assert refusals(cfg, 50) == [401] * 50


def test_invalid_trusted_proxies_is_a_config_error(cfg: Settings, tmp_path: Path) -> None:
    env = dict(settings_env(cfg), MAILMETA_API_TRUSTED_PROXIES="127.0.0.1, proxy.example")
    with pytest.raises(AssertionError) as failed:
        with sink_process(env, tmp_path / "bad.log"):
            pass
    assert "api_trusted_proxies" in str(failed.value)
    assert "'proxy.example' is not a network" in str(failed.value)


def test_internal_drain_needs_the_operator_token(cfg: Settings, tmp_path: Path) -> None:
    with sink_process(settings_env(cfg), tmp_path / "drain.log"):
        anonymous = httpx.get(f"{url(cfg)}/internal/drain/n1", timeout=10)
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        with httpx.Client(base_url=url(cfg), timeout=10, headers=operator(cfg)) as c:
            customer_token = c.post(
                "/v1/tokens", json={"customer": "north", "scopes": ["messages:read"]}
            ).json()["token"]
            status = c.get("/internal/drain/n1")
        assert status.status_code == 200
        assert status.json()["drained"] is False
        customer = httpx.get(
            f"{url(cfg)}/internal/drain/n1",
            headers={"Authorization": f"Bearer {customer_token}"},
            timeout=10,
        )
        assert customer.status_code == 403


def _fill(cfg: Settings) -> None:
    rows = Redacted(load_customers(cfg.config))
    for customer in ("north", "south"):
        events = [
            rows(customer, subject=f"export load {i} " + "x" * 200)
            for i in range(ROWS_PER_CUSTOMER)
        ]
        produce(cfg.kafka_bootstrap, cfg.redacted_topic, [encode_event(e) for e in events])

    def stored() -> bool:
        for customer in ("north", "south"):
            r = httpx.get(
                f"{url(cfg)}/v1/stats", params={"customer": customer}, headers=operator(cfg)
            )
            totals = r.json()["totals"] if r.status_code == 200 else {}
            if sum(t["messages"] for t in totals.values()) < ROWS_PER_CUSTOMER:
                return False
        return True

    wait_until(stored, 120, "every row stored", interval=0.5)


@contextmanager
def _service_with_rows(s: Settings, log: Path) -> Iterator[tuple[Settings, SinkProcess]]:
    with sink_process(settings_env(s), log) as proc:
        _fill(s)
        yield s, proc


@pytest.fixture
def loaded(cfg: Settings, tmp_path: Path) -> Iterator[tuple[Settings, SinkProcess]]:
    # Three in all, two per customer: both bounds can be reached with two customers.
    s = cfg.model_copy(update={"api_export_max_total": 3})
    with _service_with_rows(s, tmp_path / "export.log") as loaded:
        yield loaded


@pytest.fixture
def loaded_defaults(cfg: Settings, tmp_path: Path) -> Iterator[tuple[Settings, SinkProcess]]:
    with _service_with_rows(cfg, tmp_path / "rss.log") as loaded:
        yield loaded


def _held(s: Settings, customer: str, stack: ExitStack) -> httpx.Response:
    """An export whose client reads nothing: the service holds it open, blocked on send."""
    client = stack.enter_context(httpx.Client(base_url=url(s), headers=operator(s), timeout=60))
    r = stack.enter_context(client.stream("GET", "/v1/export", params={"customer": customer}))
    assert r.status_code == 200
    return r


def _rows(r: httpx.Response) -> int:
    return sum(1 for line in r.iter_lines() if line)


def _export(s: Settings, customer: str) -> httpx.Response:
    return httpx.get(
        f"{url(s)}/v1/export", params={"customer": customer}, headers=operator(s), timeout=120
    )


def test_concurrent_exports_beyond_the_bounds_get_429(
    loaded: tuple[Settings, SinkProcess],
) -> None:
    s, _ = loaded
    with ExitStack() as stack:
        held = [_held(s, "north", stack), _held(s, "north", stack)]
        third = _export(s, "north")
        assert third.status_code == 429
        assert "of this customer" in third.json()["error"]
        assert int(third.headers["Retry-After"]) >= 1
        held.append(_held(s, "south", stack))  # the third in all
        fourth = _export(s, "south")
        assert fourth.status_code == 429
        assert "too many exports are running" in fourth.json()["error"]
        assert int(fourth.headers["Retry-After"]) >= 1
        # The held exports complete, every row in each.
        assert [_rows(r) for r in held] == [ROWS_PER_CUSTOMER] * 3
    # Their slots are free again once they end.
    again = _export(s, "north")
    assert again.status_code == 200
    assert len(again.text.splitlines()) == ROWS_PER_CUSTOMER


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_rss_stays_bounded_under_concurrent_exports(
    loaded_defaults: tuple[Settings, SinkProcess],
) -> None:
    s, proc = loaded_defaults
    assert _export(s, "north").status_code == 200  # warm: the first export's caches
    base = _rss_mib(proc.proc.pid)
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.05):
            peak = max(peak, _rss_mib(proc.proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    codes: list[int] = []
    try:
        for _ in range(4):
            with ThreadPoolExecutor(CLIENTS) as pool:
                answers = pool.map(_export, [s] * CLIENTS, ["north", "south"] * (CLIENTS // 2))
                codes += [r.status_code for r in answers]
    finally:
        stop.set()
        sampler.join(5)
    assert len(codes) == 4 * CLIENTS and set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 4  # every round, at least one export of each customer ran
    print(f"RSS: {base:.0f} MiB after one export, peak {peak:.0f} MiB; {codes.count(429)} × 429")
    assert peak - base < RSS_GROWTH_BOUND_MIB, (base, peak)
