"""Broker failures on a real 3-broker Apache Kafka (KRaft) cluster, under real SMTP load.

The pipeline (`mailmeta up --kafka-bootstrap`) runs on the session's cluster with topics of
replication factor 3 and min.insync.replicas 2, each test on its own topics. Brokers are
killed by PID with SIGKILL; each test restarts what it killed before it ends.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from tests.kafka_cluster import KafkaCluster
from tests.up_helpers import Stream, Up, assert_stored_once, mailmeta_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.kafka, pytest.mark.timeout(900)]


@pytest.fixture
def topics_env(kafka_cluster: KafkaCluster) -> Iterator[dict[str, str]]:
    """This test's own topics and groups on the shared cluster; every broker up afterwards."""
    p = f"f{uuid.uuid4().hex[:8]}"
    yield {
        "MAILMETA_KAFKA_SINGLE_NODE": "false",
        "MAILMETA_RAW_TOPIC": f"{p}.raw",
        "MAILMETA_REDACTED_TOPIC": f"{p}.redacted",
        "MAILMETA_DEADLETTER_TOPIC": f"{p}.deadletter",
        "MAILMETA_POLICIES_TOPIC": f"{p}.policies",
    }
    for node in kafka_cluster.nodes:
        if not node.running:
            node.start(timeout=120)
    kafka_cluster.wait_ready(120)


def _up(data: Path, cluster: KafkaCluster, env: dict[str, str]):  # type: ignore[no-untyped-def]
    return mailmeta_up(data, "--kafka-bootstrap", cluster.bootstrap, env=env)


def _refusals_are_temporary(stream: Stream) -> None:
    assert all(400 <= code < 500 for code in stream.refused), sorted(set(stream.refused))


def test_topics_are_replicated_three_ways_with_min_isr_two(
    kafka_cluster: KafkaCluster, topics_env: dict[str, str], tmp_path: Path
) -> None:
    with _up(tmp_path / "mm", kafka_cluster, topics_env):
        admin = AdminClient({"bootstrap.servers": kafka_cluster.bootstrap})
        raw = topics_env["MAILMETA_RAW_TOPIC"]
        md = admin.list_topics(raw, timeout=10).topics[raw]
        assert {len(p.replicas) for p in md.partitions.values()} == {3}
        [fut] = admin.describe_configs([ConfigResource("TOPIC", raw)]).values()
        assert fut.result(10)["min.insync.replicas"].value == "2"


def test_leader_of_the_raw_topic_killed_under_load(
    kafka_cluster: KafkaCluster, topics_env: dict[str, str], tmp_path: Path
) -> None:
    """~2,000 mails; the raw partition leader is SIGKILLed after the first few hundred: every
    250 is stored exactly once (rows and hourly stats), every other reply was a 4xx."""
    with _up(tmp_path / "mm", kafka_cluster, topics_env) as up:
        with Stream(up.smtp_port, threads=4, limit=2000) as stream:
            stream.wait_acked(300, timeout=120)
            leader = kafka_cluster.leader_of(topics_env["MAILMETA_RAW_TOPIC"], 0)
            leader.kill()
            stream.wait_done(600)
            leader.start(timeout=120)
        _refusals_are_temporary(stream)
        assert len(stream.acked) > 1500, (len(stream.acked), len(stream.refused))
        assert_stored_once(up, stream.acked, timeout=300)


def test_two_of_three_brokers_down_nothing_acknowledged_is_lost(
    kafka_cluster: KafkaCluster, topics_env: dict[str, str], tmp_path: Path
) -> None:
    """Below min.insync.replicas the broker cannot acknowledge: ingest spools (250 from its
    disk spool) or answers 4xx; once the brokers return, everything acknowledged arrives."""
    with _up(tmp_path / "mm", kafka_cluster, topics_env) as up:
        with Stream(up.smtp_port) as stream:
            stream.wait_acked(20)
            first = kafka_cluster.leader_of(topics_env["MAILMETA_RAW_TOPIC"], 0)
            second = next(n for n in kafka_cluster.nodes if n is not first)
            first.kill()
            second.kill()
            # Mail keeps being answered (spooled) or refused with a 4xx, never lost.
            stream.wait_acked(10, timeout=120)
            first.start(wait=False)
            second.start(wait=False)
            kafka_cluster.wait_ready(180)
            stream.wait_acked(20, timeout=180)  # flowing through the brokers again
        _refusals_are_temporary(stream)
        assert_stored_once(up, stream.acked, timeout=300)


@pytest.mark.parametrize("part", ["streams", "sink"])
def test_worker_or_sink_killed_mid_batch_on_the_cluster(
    part: str, kafka_cluster: KafkaCluster, topics_env: dict[str, str], tmp_path: Path
) -> None:
    with _up(tmp_path / "mm", kafka_cluster, topics_env) as up:
        with Stream(up.smtp_port, threads=2) as stream:
            stream.wait_acked(100, timeout=120)
            up.kill_part(part)
            up.wait_line(f"{part:<8} restarted", 120)
            stream.wait_acked(100, timeout=180)
        _refusals_are_temporary(stream)
        assert_stored_once(up, stream.acked, timeout=300)


def _api(up: Up, method: str, path: str, **kw: object) -> httpx.Response:
    return httpx.request(method, f"{up.api}{path}", headers=up.headers, timeout=30, **kw)  # type: ignore[arg-type]


def test_operator_state_survives_a_full_cluster_restart(
    kafka_cluster: KafkaCluster, topics_env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "mm"
    with _up(data, kafka_cluster, topics_env) as up:
        doc = _api(up, "GET", "/v1/policies/demo").json()["policy"]
        doc["subject"] = "drop"
        assert _api(up, "PUT", "/v1/policies/demo", json={"policy": doc}).status_code == 200
        assert _api(up, "PUT", "/v1/retention/demo", json={"days": 30}).status_code == 200
        made = _api(up, "POST", "/v1/tokens", json={"name": "gone", "customer": "demo",
                                                    "scopes": ["messages:read"]}).json()  # fmt: skip
        assert _api(up, "DELETE", f"/v1/tokens/{made['id']}").status_code in (200, 204)
    for node in kafka_cluster.nodes:  # graceful, one after the other, then all back
        node.stop()
    kafka_cluster.start(timeout=180)
    with _up(data, kafka_cluster, topics_env) as up2:
        shown = _api(up2, "GET", "/v1/policies/demo").json()
        assert shown["version"] == 2 and shown["policy"]["subject"] == "drop"
        assert _api(up2, "GET", "/v1/retention").json()["retention_days"]["demo"] == 30
        r = httpx.get(f"{up2.api}/v1/messages", params={"customer": "demo"},
                      headers={"Authorization": f"Bearer {made['token']}"}, timeout=10)  # fmt: skip
        assert r.status_code == 401
        with Stream(up2.smtp_port, limit=1) as one:
            one.wait_done(60)
        row = up2.wait_messages(1, message_id=one.acked[0])[0]
        assert row["subject"] is None and row["policy_version"] == 2
