"""Measured facts about the test Apache Kafka (docs/kafka.md): start times, memory, idle CPU.

.venv/bin/python bench/kafka_facts.py [--runs 3] [--records 200000] [--idle 20] [--jvm-variants]
.venv/bin/python bench/kafka_facts.py --only idle [--idle 20] [--settle 10]    # just 4.

1. Single KRaft node: format time, start-to-ready on a fresh dir and again on the same dir.
2. 3-broker KRaft cluster: start-to-ready (all nodes answer and all brokers are registered).
3. VmRSS of each cluster broker after start and after a load: ``--records`` records of 200 bytes
   produced with acks=all to an RF 3 / min.insync.replicas 2 topic, then read back.
4. Idle CPU (utime+stime from /proc over ``--idle`` s, after a settle) of one Kafka node vs the
   bundled Tansu broker.
``--jvm-variants`` also times a single-node start with other JVM options (full JIT, the JVM's
own defaults) and repeats the load on a cluster with full JIT (THROUGHPUT_JVM_OPTS).
Start-to-ready is timed from the launch of the JVM to the first metadata answer that lists the
broker, as :meth:`KafkaNode.wait_ready` sees it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from _report import header
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from mailmeta.local.apache_kafka import DEFAULT_JVM_OPTS, THROUGHPUT_JVM_OPTS, KafkaNode, kafka_home
from mailmeta.local.brokers import LocalBroker
from mailmeta.local.process import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.kafka_cluster
from tests.kafka_cluster import KafkaCluster

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def summary(xs: Sequence[float]) -> str:
    return (
        f"median {statistics.median(xs):.1f} s (min {min(xs):.1f}, max {max(xs):.1f}, n={len(xs)})"
    )


def single_node(runs: int, jvm_opts: Sequence[str] | None) -> tuple[list[float], ...]:
    fmt, fresh, again = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            node = KafkaNode(Path(tmp), jvm_opts=jvm_opts)
            t = time.monotonic()
            node.format()
            fmt.append(time.monotonic() - t)
            t = time.monotonic()
            node.start(timeout=120)
            fresh.append(time.monotonic() - t)
            node.stop()
            t = time.monotonic()
            node.start(timeout=120)
            again.append(time.monotonic() - t)
            node.stop()
    return fmt, fresh, again


def load(cluster: KafkaCluster, records: int) -> tuple[float, float]:
    """Produce ``records`` x 200 B with acks=all to RF 3 and read them back; rates in rec/s."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
    new = NewTopic(
        topic, num_partitions=3, replication_factor=3, config={"min.insync.replicas": "2"}
    )
    admin.create_topics([new])[topic].result(timeout=30)
    p = Producer(
        {
            "bootstrap.servers": cluster.bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
        }
    )
    value = b"x" * 200
    t = time.monotonic()
    for i in range(records):
        while True:
            try:
                p.produce(topic, value, key=str(i).encode())
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    if p.flush(120) != 0:
        raise SystemExit("producer did not finish within 120 s")
    produced = records / (time.monotonic() - t)
    c = Consumer(
        {
            "bootstrap.servers": cluster.bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.subscribe([topic])
    got = 0
    t = time.monotonic()
    deadline = t + 120
    while got < records and time.monotonic() < deadline:
        got += sum(1 for m in c.consume(10000, 0.5) if m.error() is None)
    consumed = got / (time.monotonic() - t)
    c.close()
    if got < records:
        raise SystemExit(f"read back only {got} of {records} records")
    return produced, consumed


def idle_cpu(pid: int, settle: float, seconds: float) -> float:
    time.sleep(settle)
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - before) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--idle", type=float, default=20)
    ap.add_argument("--settle", type=float, default=10)
    ap.add_argument("--jvm-variants", action="store_true")
    ap.add_argument("--only", choices=["all", "idle"], default="all", help="idle: just 4.")
    args = ap.parse_args()
    header()
    print(f"Apache Kafka from {kafka_home()}, JVM options {' '.join(DEFAULT_JVM_OPTS)}")
    if args.only == "all":
        startup_memory_load(args)
    idle_kafka_vs_tansu(args.settle, args.idle)


def startup_memory_load(args: argparse.Namespace) -> None:
    fmt, fresh, again = single_node(args.runs, None)
    print(f"single node: format {summary(fmt)}")
    print(f"single node: start to ready, fresh dir {summary(fresh)}")
    print(f"single node: start to ready, restart on same dir {summary(again)}")
    if args.jvm_variants:
        variants = {
            "full JIT (THROUGHPUT_JVM_OPTS)": list(THROUGHPUT_JVM_OPTS),
            "default heap/GC (no options)": [],
        }
        for name, opts in variants.items():
            _, fresh_v, _ = single_node(args.runs, opts)
            print(f"single node, {name}: start to ready {summary(fresh_v)}")

    starts = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            cluster = KafkaCluster(Path(tmp), n=3)
            t = time.monotonic()
            cluster.start(timeout=180)
            starts.append(time.monotonic() - t)
            try:
                if run == args.runs - 1:
                    rss = [rss_mib(n.pid or 0) for n in cluster.nodes]
                    print(
                        f"3-broker cluster: VmRSS after start {', '.join(f'{r:.0f}' for r in rss)} MiB"
                    )
                    produced, consumed = load(cluster, args.records)
                    rss = [rss_mib(n.pid or 0) for n in cluster.nodes]
                    print(
                        f"3-broker cluster: {args.records} x 200 B, acks=all RF 3: produced "
                        f"{produced:,.0f} rec/s, read back {consumed:,.0f} rec/s"
                    )
                    print(
                        f"3-broker cluster: VmRSS after load {', '.join(f'{r:.0f}' for r in rss)} MiB"
                    )
            finally:
                t = time.monotonic()
                cluster.stop()
                stop = time.monotonic() - t
    print(f"3-broker cluster: start to ready {summary(starts)}; graceful stop {stop:.1f} s")
    if args.jvm_variants:
        with (
            tempfile.TemporaryDirectory() as tmp,
            KafkaCluster(Path(tmp), n=3, jvm_opts=THROUGHPUT_JVM_OPTS) as cluster,
        ):
            produced, consumed = load(cluster, args.records)
            rss = [rss_mib(n.pid or 0) for n in cluster.nodes]
            print(
                f"3-broker cluster, full JIT: produced {produced:,.0f} rec/s, read back "
                f"{consumed:,.0f} rec/s; VmRSS after load {', '.join(f'{r:.0f}' for r in rss)} MiB"
            )


def idle_kafka_vs_tansu(settle: float, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        node = KafkaNode(Path(tmp)).start(timeout=120)
        try:
            kafka_cpu = idle_cpu(node.pid or 0, settle, seconds)
            kafka_rss = rss_mib(node.pid or 0)
        finally:
            node.stop()
    with LocalBroker("tansu", free_port()) as tansu:
        tansu_cpu = idle_cpu(tansu.pid or 0, settle, seconds)
        tansu_rss = rss_mib(tansu.pid or 0)
    print(
        f"idle ({seconds:.0f} s after {settle:.0f} s settle): Apache Kafka node "
        f"{kafka_cpu:.1f} % of a core, VmRSS {kafka_rss:.0f} MiB; "
        f"Tansu {tansu_cpu:.1f} % of a core, VmRSS {tansu_rss:.0f} MiB; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
