"""Sink throughput through the broker vs a raw insert_arrow of the same rows, in one run.

.venv/bin/python bench/sink_throughput.py [--rows 200000]

1. raw: the same events as one Arrow table per sink batch (MAX_ROWS) (built beforehand, not timed),
   inserted with clickhouse-connect's insert_arrow into a fresh embedded ClickHouse.
2. sink: the events produced to a local Tansu topic beforehand; a SinkService (consumer,
   decode, validate, batch, insert, commit) into another fresh data dir. Timed from the
   first stored row to the last (the consumer-group join is reported apart).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _report import header
from confluent_kafka import Producer

from mailmeta.config import Customer, Customers, Settings
from mailmeta.kafka import ensure_topics
from mailmeta.local.brokers import LocalBroker
from mailmeta.local.process import free_port
from mailmeta.schema import Event, encode_event, format_time, new_event_id
from mailmeta.service import SinkService
from mailmeta.sinks import MAX_ROWS
from mailmeta.store import TABLE, ClickHouseStore, to_arrow

BATCH = MAX_ROWS  # the raw inserts use the sink's own batch size
CUSTOMERS = Customers(
    [Customer(id=f"c{i}", domains=[f"c{i}.example"], retention_days=60) for i in range(10)]
)


def events(n: int) -> list[Event]:
    base = datetime.now(UTC) - timedelta(hours=1)
    return [
        Event(
            event_id=new_event_id(),
            received_at=format_time(base + timedelta(milliseconds=i)),
            customer_id=f"c{i % 10}",
            status="delivered",
            sender_ip="198.51.100.0/24",
            mail_from="k1:" + "ab" * 32,
            rcpt_to=["j***@c.example"],
            message_id=f"<{uuid.uuid4().hex}@mx.example>",
            subject=f"Invoice {i}",
            date="Tue, 1 Jul 2003 10:52:37 +0200",
            size_bytes=2048 + i % 1000,
            smtp_reply="250 2.0.0 Ok: queued",
            processing_ms=3.25,
            tls_version="TLSv1.3",
            policy_version=1,
        )
        for i in range(n)
    ]


def cpu_seconds(pid: int | None = None) -> float:
    """User+system CPU of this process (or of pid), from /proc: what the machine spent."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raw_insert(evs: list[Event], tmp: Path) -> tuple[float, float]:
    retention = {c.id: c.retention_days for c in CUSTOMERS}
    tables = [to_arrow(evs[i : i + BATCH], retention) for i in range(0, len(evs), BATCH)]
    with ClickHouseStore(f"chdb://{tmp / 'raw'}", retention) as store:
        with store._client() as client:
            t0, c0 = time.perf_counter(), cpu_seconds()
            for t in tables:
                client.insert_arrow(TABLE, t)
            took, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        assert store.count() == len(evs)
    return len(evs) / took, cpu / len(evs) * 1e6


def through_sink(
    evs: list[Event], tmp: Path, broker: LocalBroker
) -> tuple[float, float, float, float]:
    s = Settings(
        config=Path("/nonexistent"),
        data_dir=tmp / "sink",
        kafka_bootstrap=broker.bootstrap,
        raw_topic="bench.raw",
        redacted_topic="bench.redacted",
        deadletter_topic="bench.deadletter",
        partitions=3,
        api_port=free_port(),
        kafka_single_node=True,  # one local broker, as `mailmeta up` runs it
    )
    ensure_topics(s, 60)
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 20, "batch.size": 1 << 20})
    for i, e in enumerate(evs):
        p.produce(s.redacted_topic, encode_event(e), partition=i % 3)
        if i % 50_000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    t_start = time.perf_counter()
    with SinkService(s, CUSTOMERS, group_id=f"bench-{uuid.uuid4().hex}") as sink:
        assert sink.consumer is not None
        stats = sink.consumer.stats
        deadline = time.monotonic() + 300
        while stats.rows_inserted == 0:
            _check(stats, deadline)
        t_first = time.perf_counter()
        c_first, b_first = cpu_seconds(), cpu_seconds(broker.pid)
        first = stats.rows_inserted
        while stats.rows_inserted < len(evs):
            _check(stats, deadline)
        t_end = time.perf_counter()
        cpu, broker_cpu = cpu_seconds() - c_first, cpu_seconds(broker.pid) - b_first
    n = max(len(evs) - first, 1)  # a tiny run may land in one insert
    return n / max(t_end - t_first, 1e-9), t_first - t_start, cpu / n * 1e6, broker_cpu / n * 1e6


def _check(stats: object, deadline: float) -> None:
    # A failed or stuck sink ends the run with its state rather than hanging it.
    if time.monotonic() > deadline or getattr(stats, "state", "") in ("failed", "stopped"):
        raise SystemExit(f"sink did not store every row: {stats}")
    time.sleep(0.005)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    args = ap.parse_args()
    header()
    evs = events(args.rows)
    with tempfile.TemporaryDirectory() as tmp, LocalBroker("tansu", free_port()) as broker:
        raw, raw_cpu = raw_insert(evs, Path(tmp))
        sink, join, sink_cpu, broker_cpu = through_sink(evs, Path(tmp), broker)
    print(f"rows:              {args.rows} on {os.cpu_count()} cores")
    print(
        f"raw insert_arrow:  {raw:,.0f} rows/s, {raw_cpu:.1f} CPU-us/row "
        f"(prebuilt Arrow tables of {BATCH})"
    )
    print(
        f"sink via broker:   {sink:,.0f} rows/s, {sink_cpu:.1f} CPU-us/row "
        f"+ {broker_cpu:.1f} in the broker (after a {join:.1f} s group join)"
    )
    print(f"ratio sink/raw:    {sink / raw:.2f}")


if __name__ == "__main__":
    main()
