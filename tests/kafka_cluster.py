"""Pytest fixtures on real Apache Kafka (KRaft): one node and a 3-broker cluster, per session.

Both run the pinned Kafka that ``tests/tools/fetch_kafka.sh`` fetched (``make test`` does) and
have, besides their PLAINTEXT listener, a SASL_PLAINTEXT listener that accepts SCRAM-SHA-512 for
:data:`SCRAM_USER` / :data:`SCRAM_PASSWORD`. They are stopped by PID when the session ends.

Use them from a test module by importing them; to share one cluster between several modules,
list this module in the root conftest's ``pytest_plugins`` instead (a fixture imported into two
modules is two fixtures: two clusters).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from mailmeta.local.apache_kafka import KafkaCluster, KafkaNode

SCRAM_USER = "mailmeta"
# A new password each session: nothing may depend on a well-known one.
SCRAM_PASSWORD = secrets.token_urlsafe(18)


@pytest.fixture(scope="session")
def apache_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaNode]:
    """A single KRaft node (broker + controller) with a durable data dir."""
    node = KafkaNode(
        tmp_path_factory.mktemp("kafka-node"), scram_users={SCRAM_USER: SCRAM_PASSWORD}
    )
    node.start(timeout=90)
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    """Three KRaft nodes (each broker + controller voter): internal topics RF 3, min ISR 2."""
    cluster = KafkaCluster(
        tmp_path_factory.mktemp("kafka-cluster"), n=3, scram_users={SCRAM_USER: SCRAM_PASSWORD}
    )
    cluster.start(timeout=120)
    try:
        yield cluster
    finally:
        cluster.stop()
