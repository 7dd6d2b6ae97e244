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
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from confluent_kafka import Producer

from mailmeta.config import Customer, Customers, Settings
from mailmeta.kafka import ensure_topics
from mailmeta.local.brokers import LocalBroker, free_port
from mailmeta.schema import Event, encode_event, format_time, new_event_id
from mailmeta.sinks import SinkService
from mailmeta.sinks._consumer import MAX_ROWS
from mailmeta.sinks.store import ClickHouseStore
from mailmeta.sinks.store._migrations import TABLE
from mailmeta.sinks.store._rows import to_arrow

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


def raw_insert(evs: list[Event], tmp: Path) -> float:
    retention = {c.id: c.retention_days for c in CUSTOMERS}
    tables = [to_arrow(evs[i : i + BATCH], retention) for i in range(0, len(evs), BATCH)]
    with ClickHouseStore(f"chdb://{tmp / 'raw'}", retention) as store:
        with store._client() as client:
            t0 = time.perf_counter()
            for t in tables:
                client.insert_arrow(TABLE, t)
            took = time.perf_counter() - t0
        assert store.count() == len(evs)
    return len(evs) / took


def through_sink(evs: list[Event], tmp: Path, broker: LocalBroker) -> tuple[float, float]:
    s = Settings(
        config=Path("/nonexistent"),
        data_dir=tmp / "sink",
        kafka_bootstrap=broker.bootstrap,
        raw_topic="bench.raw",
        redacted_topic="bench.redacted",
        deadletter_topic="bench.deadletter",
        partitions=3,
        api_port=free_port(),
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
        first = stats.rows_inserted
        while stats.rows_inserted < len(evs):
            _check(stats, deadline)
        t_end = time.perf_counter()
    return (len(evs) - first) / (t_end - t_first), t_first - t_start


def _check(stats: object, deadline: float) -> None:
    # A failed or stuck sink ends the run with its state rather than hanging it.
    if time.monotonic() > deadline or getattr(stats, "state", "") in ("failed", "stopped"):
        raise SystemExit(f"sink did not store every row: {stats}")
    time.sleep(0.005)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    args = ap.parse_args()
    evs = events(args.rows)
    with tempfile.TemporaryDirectory() as tmp, LocalBroker("tansu", free_port()) as broker:
        raw = raw_insert(evs, Path(tmp))
        sink, join = through_sink(evs, Path(tmp), broker)
    print(f"rows:              {args.rows}")
    print(f"raw insert_arrow:  {raw:,.0f} rows/s (prebuilt Arrow tables of {BATCH})")
    print(f"sink via broker:   {sink:,.0f} rows/s (after a {join:.1f} s group join)")
    print(f"ratio sink/raw:    {sink / raw:.2f}")


if __name__ == "__main__":
    main()
