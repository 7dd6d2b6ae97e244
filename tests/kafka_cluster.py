"""Real Apache Kafka (KRaft) for tests: :class:`KafkaCluster` (n nodes on 127.0.0.1, with
:meth:`~KafkaCluster.leader_of` and :meth:`~KafkaCluster.isr_of` for failure tests) and pytest
fixtures with one node and a 3-broker cluster, per session. The node is the product's
:class:`~mailmeta.local.apache_kafka.KafkaNode` (what `mailmeta up` runs).

Both run the pinned Kafka that ``tests/tools/fetch_kafka.sh`` fetched (``make test`` does) and
have, besides their PLAINTEXT listener, a SASL_PLAINTEXT listener that accepts SCRAM-SHA-512 for
:data:`SCRAM_USER` / :data:`SCRAM_PASSWORD`. They are stopped by PID when the session ends.

Use them from a test module by importing them; to share one cluster between several modules,
list this module in the root conftest's ``pytest_plugins`` instead (a fixture imported into two
modules is two fixtures: two clusters).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import pytest
from confluent_kafka.admin import ClusterMetadata

from mailmeta.local.apache_kafka import KafkaNode, kafka_home, new_cluster_id
from mailmeta.local.brokers import probe_admin, wait_answering
from mailmeta.local.process import free_ports

SCRAM_USER = "mailmeta"
# A new password each session: nothing may depend on a well-known one.
SCRAM_PASSWORD = secrets.token_urlsafe(18)


class KafkaCluster:
    """``n`` KRaft combined nodes on 127.0.0.1 forming one cluster (every node is a voter).

    Internal topics get replication factor ``min(3, n)`` and min.insync.replicas ``min(2, n)``.
    Keyword arguments other than ``n`` are passed to every :class:`KafkaNode`.
    """

    def __init__(
        self,
        base_dir: Path,
        n: int = 3,
        *,
        scram_users: Mapping[str, str] | None = None,
        overrides: Mapping[str, str | int | bool] | None = None,
        jvm_opts: Sequence[str] | None = None,
        home: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one node, got n={n}")
        per_node = 3 if scram_users else 2
        ports = iter(free_ports(n * per_node))
        plan = [(i + 1, next(ports), next(ports)) for i in range(n)]
        voters = ",".join(f"{i}@127.0.0.1:{cport}" for i, _, cport in plan)
        cluster_id = new_cluster_id()
        home = home if home is not None else kafka_home()
        self.nodes: list[KafkaNode] = [
            KafkaNode(
                Path(base_dir) / f"node-{i}",
                node_id=i,
                port=port,
                controller_port=cport,
                voters=voters,
                cluster_id=cluster_id,
                replication=n,
                scram_users=scram_users,
                sasl_port=next(ports) if scram_users else None,
                overrides=overrides,
                jvm_opts=jvm_opts,
                home=home,
                die_with_parent=die_with_parent,
            )
            for i, port, cport in plan
        ]

    @property
    def bootstrap(self) -> str:
        """Comma-separated PLAINTEXT addresses of all nodes."""
        return ",".join(n.bootstrap for n in self.nodes)

    @property
    def sasl_bootstrap(self) -> str | None:
        """Comma-separated SCRAM listener addresses, if the cluster has them."""
        addrs = [n.sasl_bootstrap for n in self.nodes if n.sasl_bootstrap]
        return ",".join(addrs) or None

    def node(self, node_id: int) -> KafkaNode:
        """The node with KRaft ``node.id`` ``node_id``."""
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(f"no node with id {node_id} in {[n.node_id for n in self.nodes]}")

    def start(self, timeout: float = 90.0) -> KafkaCluster:
        """Start every node, then wait until each answers and all brokers are registered."""
        try:
            for n in self.nodes:
                if not n.running:
                    n.start(wait=False)
            self.wait_ready(timeout)
        except BaseException:
            self.stop(timeout=10)
            raise
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Every running node answers metadata and lists every running node as a broker."""
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            if n.running:
                n.wait_ready(max(1.0, deadline - time.monotonic()))
        want = {n.node_id for n in self.nodes if n.running}

        def all_registered(md: ClusterMetadata) -> str | None:
            seen = set(md.brokers)
            return None if want <= seen else f"brokers {sorted(seen)}, want {sorted(want)}"

        wait_answering(
            self.bootstrap,
            max(1.0, deadline - time.monotonic()),
            name="cluster",
            until=all_registered,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every node at once, wait (bounded) for all, SIGKILL any still running.

        All at once: stopped one by one, the last nodes would wait for a controller quorum
        that is already gone.
        """
        for n in self.nodes:
            n.signal_stop()
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            n.stop(max(0.1, deadline - time.monotonic()))

    def leader_of(self, topic: str, partition: int = 0, timeout: float = 10.0) -> KafkaNode:
        """The node that leads ``topic``/``partition`` now (asked of the running nodes).

        Polls (bounded) while the partition has no leader, e.g. right after a leader was killed.
        """
        running = ",".join(n.bootstrap for n in self.nodes if n.running)
        if not running:
            raise RuntimeError("no node of the cluster is running")
        admin = probe_admin(running)
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                md = admin.list_topics(topic, timeout=2)
                part = md.topics[topic].partitions.get(partition)
                if md.topics[topic].error is not None:
                    last = md.topics[topic].error
                elif part is None:
                    raise ValueError(f"topic {topic!r} has no partition {partition}")
                elif part.leader >= 0:
                    return self.node(part.leader)
                else:
                    last = f"{topic}/{partition} has no leader"
            except ValueError:
                raise
            except Exception as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"no leader for {topic}/{partition} within {timeout}s: {last}")

    def isr_of(self, topic: str, partition: int = 0) -> list[int]:
        """In-sync replica ids of ``topic``/``partition`` as the running nodes report them."""
        running = ",".join(n.bootstrap for n in self.nodes if n.running)
        md = probe_admin(running).list_topics(topic, timeout=5)
        return list(md.topics[topic].partitions[partition].isrs)

    def __iter__(self) -> Iterator[KafkaNode]:
        return iter(self.nodes)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


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
