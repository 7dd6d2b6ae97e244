"""Webhooks on the real components: redacted events from the real redactor through Kafka, the
sink service with its webhook stage over embedded ClickHouse, endpoints made through the HTTP
API, and a real HTTP receiver on loopback (allowed explicitly) that verifies every signature
with the ``standardwebhooks`` package and can be failing, rate limiting, redirecting or dead.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from mailmeta.config import Customer, Customers, NetworkGuard, Refused
from mailmeta.local.apache_kafka import KafkaNode
from mailmeta.local.brokers import LocalBroker
from mailmeta.local.process import free_port
from mailmeta.schema import Event, encode_event
from mailmeta.service import SinkService
from tests.event_helpers import Redacted
from tests.kafka_helpers import sink_settings, wait_until
from tests.webhook_helpers import Receiver

POLICY = {
    "message_id": "keep",
    "subject": "keep",
    "date": "keep",
    "size_bytes": "keep",
    "smtp_reply": "keep",
    "processing_ms": "keep",
    "tls_version": "keep",
    "mail_from": "mask",
    "rcpt_to": "mask",
    "sender_ip": "truncate_ip",
    "helo": "drop",
}
NAMES = [
    "hooks", "outage", "deadco", "liveco", "replayco", "ssrf", "failing", "scoped", "other",
    "erased",
]  # fmt: skip
CUSTOMERS = Customers(
    [Customer(id=c, domains=[f"{c}.example"], retention_days=30, policy=POLICY) for c in NAMES]
)
redacted = Redacted(CUSTOMERS)
HORIZON_S = 8.0  # retries stop (failure log) this long after an event was queued
TIMEOUT_S = 2.0  # per request: a dead endpoint holds a request this long


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def service(
    module_broker: LocalBroker | KafkaNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SinkService]:
    tmp = tmp_path_factory.mktemp("webhooks")
    settings = sink_settings(module_broker.bootstrap, tmp, CUSTOMERS, "webhooks").model_copy(
        update={
            "webhooks_in_service": True,
            "webhook_allow_networks": "127.0.0.1/32",  # the receiver; 127.0.0.2 stays refused
            "webhook_retry_horizon_s": HORIZON_S,
            "webhook_retry_base_s": 0.2,
            "webhook_retry_max_s": 1.0,
            "webhook_timeout_s": TIMEOUT_S,
            "webhook_batch_max": 20,
        }
    )
    service = SinkService(settings, CUSTOMERS, group_id=f"{settings.raw_topic}-sink").start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def api(service: SinkService) -> Iterator[httpx.Client]:
    assert service.settings.operator_token_file is not None
    token = service.settings.operator_token_file.read_text().strip()
    with httpx.Client(
        base_url=service.url, timeout=15, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        yield client


@pytest.fixture(scope="module")
def producer(module_broker: LocalBroker | KafkaNode) -> Iterator[Producer]:
    p = Producer({"bootstrap.servers": module_broker.bootstrap, "acks": "all"})
    yield p
    p.close()


def send(producer: Producer, service: SinkService, events: list[Event]) -> None:
    for e in events:
        producer.produce(
            service.settings.redacted_topic, encode_event(e), key=e.customer_id.encode()
        )
    assert producer.flush(15) == 0


def endpoint(
    api: httpx.Client, receiver: Receiver, customer: str, path: str, **extra: Any
) -> dict[str, Any]:
    r = api.post("/v1/webhooks", json={"customer": customer, "url": receiver.url(path), **extra})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    assert body["secret"].startswith("whsec_")
    receiver.secrets[path] = body["secret"]
    return body


def events_of(customer: str, n: int, **fields: Any) -> list[Event]:
    return [redacted(customer, **fields) for _ in range(n)]


def test_every_event_arrives_once_per_endpoint_signed_and_redacted(
    api: httpx.Client, receiver: Receiver, producer: Producer, service: SinkService
) -> None:
    everything = endpoint(api, receiver, "hooks", "/hooks/all")
    endpoint(api, receiver, "hooks", "/hooks/bounced", statuses=["bounced"])
    # Shown once: reading the endpoint back never shows its secret.
    shown = api.get(f"/v1/webhooks/{everything['id']}").json()
    assert "secret" not in shown and shown["url"] == receiver.url("/hooks/all")

    events = events_of("hooks", 25) + events_of("hooks", 5, status="bounced")
    send(producer, service, events)
    ids = {e.event_id for e in events}
    wait_until(
        lambda: {e["event_id"] for e in receiver.events("/hooks/all")} == ids,
        30,
        "every event at the first endpoint",
    )
    bounced = {e.event_id for e in events if e.status == "bounced"}
    wait_until(
        lambda: {e["event_id"] for e in receiver.events("/hooks/bounced")} == bounced,
        30,
        "the bounces at the second endpoint",
    )
    assert receiver.bad == []  # every request verified with standardwebhooks
    # Once each: no event twice at an endpoint (no failures, so no retries).
    assert Counter(e["event_id"] for e in receiver.events("/hooks/all")).most_common(1)[0][1] == 1
    assert len(receiver.events("/hooks/bounced")) == len(bounced)
    # Batches: fewer requests than events, each with its own webhook-id.
    batches = receiver.deliveries("/hooks/all")
    assert len(batches) < len(events) and len({b.webhook_id for b in batches}) == len(batches)
    # What the policy stores, never more: helo is dropped, mail_from masked.
    for b in receiver.deliveries("/hooks/all") + receiver.deliveries("/hooks/bounced"):
        assert b"helo" not in b.body and b"mx.sender.example" not in b.body
        assert b"alice@sender.example" not in b.body
    by_id = {e["event_id"]: e for e in receiver.events("/hooks/all")}
    for e in events:
        assert by_id[e.event_id] == {k: v for k, v in e.to_dict().items() if v is not None}
    # The delivery log: delivered, one attempt, the answer's status; never a body.
    log = api.get(f"/v1/webhooks/{everything['id']}/deliveries").json()["deliveries"]
    assert {d["state"] for d in log} == {"delivered"} and {d["last_status"] for d in log} == {200}


def test_a_receiver_outage_loses_nothing(
    api: httpx.Client, receiver: Receiver, producer: Producer, service: SinkService
) -> None:
    path = "/outage"
    ep = endpoint(api, receiver, "outage", path)
    receiver.modes[path] = "500"
    events = events_of("outage", 30)
    send(producer, service, events)
    wait_until(lambda: sum(p == path for p, _ in receiver.hits) >= 3, 20, "failed attempts")
    receiver.modes[path] = "429"  # then rate limited, with Retry-After
    seen = sum(p == path for p, _ in receiver.hits)
    wait_until(lambda: sum(p == path for p, _ in receiver.hits) >= seen + 2, 20, "429s")
    receiver.modes[path] = "ok"
    ids = {e.event_id for e in events}
    wait_until(lambda: {e["event_id"] for e in receiver.events(path)} == ids, 30, "every event")
    assert receiver.bad == []
    log = api.get(f"/v1/webhooks/{ep['id']}/deliveries").json()["deliveries"]
    assert {d["state"] for d in log} == {"delivered"}
    assert max(d["attempts"] for d in log) >= 3
    # Prometheus: the failed attempts by outcome, the events delivered.
    assert (
        REGISTRY.get_sample_value(
            "mailmeta_webhook_attempts_total", {"endpoint": ep["id"], "outcome": "5xx"}
        )
        >= 3
    )
    assert (
        REGISTRY.get_sample_value(
            "mailmeta_webhook_attempts_total", {"endpoint": ep["id"], "outcome": "4xx"}
        )
        >= 2
    )
    assert REGISTRY.get_sample_value(
        "mailmeta_webhook_events_delivered_total", {"endpoint": ep["id"]}
    ) == len(events)
    # Retries keep the batch's webhook-id: a receiver dedupes by it.
    assert len({r.webhook_id for r in receiver.deliveries(path)}) == len(receiver.deliveries(path))


def test_a_dead_endpoint_of_one_customer_does_not_delay_another(
    api: httpx.Client, receiver: Receiver, producer: Producer, service: SinkService
) -> None:
    endpoint(api, receiver, "deadco", "/dead/hang")
    receiver.modes["/dead/hang"] = "hang"  # accepts, never answers (until the timeout)
    dead_port = free_port()  # nothing listens: connection refused
    r = api.post(
        "/v1/webhooks", json={"customer": "deadco", "url": f"http://127.0.0.1:{dead_port}/x"}
    )
    assert r.status_code == 201
    endpoint(api, receiver, "liveco", "/live")
    send(producer, service, events_of("deadco", 40))
    wait_until(
        lambda: any(p == "/dead/hang" for p, _ in receiver.hits), 20, "the dead endpoint hit"
    )
    lat = []
    for _ in range(5):
        live = events_of("liveco", 3)
        t0 = time.monotonic()
        send(producer, service, live)
        want = {e.event_id for e in live}
        wait_until(
            lambda want=want: want <= {e["event_id"] for e in receiver.events("/live")}, 20, "live"
        )
        arrived = max(
            r.at for r in receiver.deliveries("/live") if {e["event_id"] for e in r.events} & want
        )
        lat.append(arrived - t0)
    print(f"liveco produce -> delivered while deadco's endpoints hang/refuse: {sorted(lat)}")
    # Well under the dead endpoint's request timeout: nothing waited on it.
    assert max(lat) < TIMEOUT_S, lat


def test_replay_from_a_time_resends_stored_events_marked_as_replay(
    api: httpx.Client, receiver: Receiver, producer: Producer, service: SinkService
) -> None:
    path = "/replay"
    ep = endpoint(api, receiver, "replayco", path)
    events = events_of("replayco", 12)
    send(producer, service, events)
    ids = {e.event_id for e in events}
    wait_until(lambda: {e["event_id"] for e in receiver.events(path)} == ids, 30, "live events")
    # The sink stored them too (replay reads the store).
    wait_until(
        lambda: (
            len(
                api.get("/v1/messages", params={"customer": "replayco", "limit": 100}).json()[
                    "messages"
                ]
            )
            == 12
        ),
        30,
        "stored",
    )
    since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    r = api.post(f"/v1/webhooks/{ep['id']}/replay", json={"from": since})
    assert r.status_code == 202, r.text
    assert r.json()["events"] == 12
    wait_until(
        lambda: {e["event_id"] for e in receiver.events(path, replay=True)} == ids, 30, "the replay"
    )
    live_ids = {r.webhook_id for r in receiver.deliveries(path) if not r.replay}
    replay_ids = {r.webhook_id for r in receiver.deliveries(path) if r.replay}
    assert not live_ids & replay_ids  # a replay is new messages, not deduplicated away
    assert receiver.bad == []
    # A time in the future replays nothing; a bad time is a 4xx naming the field.
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert api.post(f"/v1/webhooks/{ep['id']}/replay", json={"from": future}).json()["events"] == 0
    bad = api.post(f"/v1/webhooks/{ep['id']}/replay", json={"from": "yesterday"})
    assert bad.status_code in (400, 422) and "from" in bad.text


def test_an_erasure_empties_the_outbox_of_what_it_erases(
    api: httpx.Client, receiver: Receiver, producer: Producer, service: SinkService
) -> None:
    """The outbox keeps delivered events for replay: erasure must reach it like the rows."""
    path = "/erased"
    ep = endpoint(api, receiver, "erased", path)
    victim = events_of("erased", 1, message_id="<victim@sender.example>")
    others = events_of("erased", 2)
    send(producer, service, victim + others)
    ids = {e.event_id for e in victim + others}
    wait_until(lambda: {e["event_id"] for e in receiver.events(path)} == ids, 30, "delivered")
    wait_until(
        lambda: len(api.get("/v1/messages", params={"customer": "erased"}).json()["messages"]) == 3,
        30,
        "stored",
    )
    r = api.post("/v1/erase", json={"customer": "erased", "message_id": "<victim@sender.example>"})
    assert r.status_code == 200 and r.json()["rows_removed"] == 1, r.text
    left = {
        d["event_id"] for d in api.get(f"/v1/webhooks/{ep['id']}/deliveries").json()["deliveries"]
    }
    assert left == {e.event_id for e in others}
    since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    assert api.post(f"/v1/webhooks/{ep['id']}/replay", json={"from": since}).json()["events"] == 2
    # An erasure while the replay is in flight: what the stage settles afterwards stays erased.
    r = api.post("/v1/erase", json={"customer": "erased", "all": True})
    assert r.status_code == 200, r.text
    assert api.get(f"/v1/webhooks/{ep['id']}/deliveries").json()["deliveries"] == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:8080/x",  # loopback outside the allowed 127.0.0.1/32
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://10.1.2.3/x",
        "http://[::1]:8080/x",
        "ftp://example.com/x",
        "http://user:pw@127.0.0.1/x",
    ],
)
def test_ssrf_urls_are_refused_naming_the_field(api: httpx.Client, url: str) -> None:
    r = api.post("/v1/webhooks", json={"customer": "ssrf", "url": url})
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("url:"), r.text


def test_without_the_allow_list_loopback_is_refused() -> None:
    guard = NetworkGuard.parse("")
    assert guard.refusal("127.0.0.1") is not None
    assert guard.refusal("169.254.169.254") is not None
    assert guard.refusal("::ffff:127.0.0.1") is not None
    assert guard.refusal("93.184.215.14") is None
    assert NetworkGuard.parse("127.0.0.1/32").refusal("127.0.0.1") is None
    # A name is refused by what it resolves to.
    with pytest.raises(Refused, match="localhost"):
        guard.check_url("http://localhost:8080/x")


def test_the_stage_checks_again_at_connect_time_and_follows_no_redirect(
    api: httpx.Client, receiver: Receiver, producer: Producer, service: SinkService
) -> None:
    store = service.store
    assert store is not None
    # Stored behind the API's back (as a DNS answer changed after the check would be):
    # the stage resolves and checks again, and never connects.
    elsewhere = Receiver(host="127.0.0.2")
    try:
        ep = endpoint(api, receiver, "ssrf", "/ssrf/ok")
        found = store.webhook_endpoint(ep["id"])
        assert found is not None
        found.url = elsewhere.url("/x")
        store.save_webhook_endpoint(found)
        redirecting = endpoint(api, receiver, "ssrf", "/ssrf/redirect")
        receiver.modes["/ssrf/redirect"] = "redirect:/ssrf/target"
        receiver.secrets["/ssrf/target"] = redirecting["secret"]
        send(producer, service, events_of("ssrf", 3))

        def failed(ep_id: str) -> list[dict[str, Any]]:
            log = api.get(f"/v1/webhooks/{ep_id}/deliveries", params={"state": "failed"})
            return log.json()["deliveries"]  # type: ignore[no-any-return]

        refused = wait_until(lambda: failed(ep["id"]), HORIZON_S + 20, "the refused batch failed")
        assert len(refused) == 3 and all("refused" in d["last_error"] for d in refused)
        assert elsewhere.hits == []
        redirected = wait_until(
            lambda: failed(redirecting["id"]), HORIZON_S + 20, "redirect failed"
        )
        assert {d["last_status"] for d in redirected} == {307}
        assert all(d["attempts"] >= 2 for d in redirected)
        assert not any(p == "/ssrf/target" for p, _ in receiver.hits)
        failed_total = "mailmeta_webhook_events_failed_total"
        assert REGISTRY.get_sample_value(failed_total, {"endpoint": redirecting["id"]}) == 3
    finally:
        elsewhere.close()


def test_a_customer_token_with_the_webhooks_scope_sees_only_its_endpoints(
    api: httpx.Client, receiver: Receiver
) -> None:
    other = endpoint(api, receiver, "other", "/other")
    r = api.post("/v1/tokens", json={"name": "t", "customer": "scoped", "scopes": ["webhooks"]})
    assert r.status_code == 201, r.text
    headers = {"Authorization": f"Bearer {r.json()['token']}"}
    mine = api.post("/v1/webhooks", json={"url": receiver.url("/scoped")}, headers=headers)
    assert mine.status_code == 201 and mine.json()["customer"] == "scoped"
    listed = api.get("/v1/webhooks", headers=headers).json()["endpoints"]
    assert [e["id"] for e in listed] == [mine.json()["id"]]
    assert api.get(f"/v1/webhooks/{other['id']}", headers=headers).status_code == 404
    assert api.post(f"/v1/webhooks/{other['id']}/rotate", headers=headers).status_code == 404
    # Rotation: a new secret, shown once; the old one still signs during the overlap.
    rotated = api.post(f"/v1/webhooks/{mine.json()['id']}/rotate", headers=headers)
    assert rotated.status_code == 200 and rotated.json()["secret"] != mine.json()["secret"]
    assert rotated.json()["previous_secret_until"] is not None
    # Without the scope: 403.
    r = api.post("/v1/tokens", json={"name": "t2", "customer": "scoped", "scopes": ["stats:read"]})
    no = {"Authorization": f"Bearer {r.json()['token']}"}
    assert api.get("/v1/webhooks", headers=no).status_code == 403
