"""Real Apache Kafka (KRaft) on loopback: durability across SIGKILL, leader failover on a
3-broker cluster, and the SCRAM listener. The harness is mailmeta.local.apache_kafka (one node)
and tests/kafka_cluster.py (the cluster)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from mailmeta.local.apache_kafka import KafkaNode
from tests.kafka_cluster import SCRAM_PASSWORD, SCRAM_USER, KafkaCluster
from tests.kafka_helpers import consume

# The fixtures apache_kafka and kafka_cluster come from tests/kafka_cluster.py, a plugin of
# the root conftest: one node and one cluster for the whole session.

pytestmark = pytest.mark.kafka

# librdkafka reports refused connections to killed brokers on stderr; the tests check outcomes.
_quiet = logging.getLogger("tests.apache_kafka.librdkafka")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def _create_topic(conf: dict[str, Any], topic: str, rf: int, config: dict[str, str]) -> None:
    admin = AdminClient({**conf, "logger": _quiet})  # kept alive until the future is done
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=1, replication_factor=rf, config=config)]
    )
    futures[topic].result(timeout=30)


def _produce(conf: dict[str, Any], topic: str, values: list[bytes], timeout: float = 60) -> None:
    """Produce with acks=all and idempotence; every record must be acknowledged in time."""
    failed: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            failed.append(err)

    p = Producer({**conf, "acks": "all", "enable.idempotence": True, "logger": _quiet})
    for v in values:
        p.produce(topic, v, on_delivery=on_delivery)
        p.poll(0)
    assert p.flush(timeout) == 0, "records still unacknowledged at the deadline"
    assert failed == [], f"delivery failed: {failed[:3]}"


def _consume_all(conf: dict[str, Any], topic: str, n: int, timeout: float = 60) -> list[bytes]:
    """Read from the start until ``n`` records arrived or the deadline passed."""
    extra = {k: v for k, v in conf.items() if k != "bootstrap.servers"}
    got = consume(conf["bootstrap.servers"], topic, n, timeout, logger=_quiet, **extra)
    return [m.value() or b"" for m in got]


def test_single_node_keeps_acknowledged_records_through_sigkill(apache_kafka: KafkaNode) -> None:
    node = apache_kafka
    conf = {"bootstrap.servers": node.bootstrap}
    topic = f"durable-{uuid.uuid4().hex[:8]}"
    _create_topic(conf, topic, 1, {})
    before = [f"before-{i}".encode() for i in range(500)]
    _produce(conf, topic, before)

    old_pid = node.pid
    node.kill()  # SIGKILL: no controlled shutdown, nothing flushed by the broker
    assert node.pid is None
    node.start(timeout=90)
    assert node.pid is not None and node.pid != old_pid

    after = [f"after-{i}".encode() for i in range(100)]
    _produce(conf, topic, after)
    got = _consume_all(conf, topic, len(before) + len(after))
    assert got == before + after  # every acknowledged record once, in order


def test_cluster_accepts_acks_all_after_leader_sigkill_and_the_broker_rejoins(
    kafka_cluster: KafkaCluster,
) -> None:
    cluster = kafka_cluster
    conf = {"bootstrap.servers": cluster.bootstrap}
    topic = f"failover-{uuid.uuid4().hex[:8]}"
    _create_topic(conf, topic, 3, {"min.insync.replicas": "2"})
    first = [f"first-{i}".encode() for i in range(300)]
    _produce(conf, topic, first)

    leader = cluster.leader_of(topic, 0)
    leader.kill()
    try:
        # With 2 of 3 replicas left, min.insync.replicas=2 still holds: acks=all goes on.
        second = [f"second-{i}".encode() for i in range(300)]
        _produce(conf, topic, second)
        new_leader = cluster.leader_of(topic, 0)
        assert new_leader is not leader and new_leader.running
    finally:
        leader.start(timeout=90)

    # The restarted broker catches up and is back in the ISR.
    deadline = time.monotonic() + 60
    while leader.node_id not in cluster.isr_of(topic, 0):
        assert time.monotonic() < deadline, f"node {leader.node_id} did not rejoin the ISR"
        time.sleep(0.2)
    got = _consume_all(conf, topic, len(first) + len(second))
    assert got == first + second  # nothing lost, nothing doubled


def test_scram_listener_accepts_right_credentials_and_refuses_wrong_ones(
    apache_kafka: KafkaNode,
) -> None:
    node = apache_kafka
    right = node.sasl_client_config(SCRAM_USER, SCRAM_PASSWORD)
    topic = f"scram-{uuid.uuid4().hex[:8]}"
    _create_topic(right, topic, 1, {})
    _produce(right, topic, [b"over SCRAM"])
    assert _consume_all(right, topic, 1) == [b"over SCRAM"]

    errors: list[KafkaError] = []
    wrong = node.sasl_client_config(SCRAM_USER, SCRAM_PASSWORD + "x")
    p = Producer({**wrong, "error_cb": errors.append, "logger": _quiet})
    deadline = time.monotonic() + 15
    while not errors and time.monotonic() < deadline:
        p.poll(0.2)
    assert errors, "no error reported for a wrong password"
    assert errors[0].code() == KafkaError._AUTHENTICATION
    assert "invalid credentials" in errors[0].str()
    assert "SCRAM-SHA-512" in errors[0].str()
    # The plaintext listener stays open, the password was never written to the broker's log.
    assert SCRAM_PASSWORD not in node.log_path.read_text(errors="replace")
