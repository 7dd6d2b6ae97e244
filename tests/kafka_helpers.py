"""Reusable test helpers: wait for a condition, consume a topic with bounded waits, run a stage
as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

from mailmeta.config import Customers, Settings
from mailmeta.kafka import ensure_topics
from mailmeta.local.process import Spawned, free_port

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 20.0,
    what: str = "condition",
    interval: float = 0.1,
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that, or fail after
    ``timeout`` s naming ``what``. Tests synchronise on conditions this way, never on sleeps."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def produce(bootstrap: str, topic: str, values: list[bytes], partition: int | None = None) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    for v in values:
        if partition is None:
            p.produce(topic, v, key=uuid.uuid4().bytes)
        else:
            p.produce(topic, v, partition=partition)
    try:
        assert p.flush(15) == 0, "broker did not acknowledge every record"
    finally:
        p.close()  # else its threads outlive the test, reconnecting to a stopped broker


def consume(
    bootstrap: str, topic: str, n: int, timeout: float = 30.0, **client: Any
) -> list[Message]:
    """Read at least ``n`` records from the start of ``topic`` (or until the timeout);
    ``client``: extra consumer settings (e.g. SASL)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            **client,
        }
    )
    out: list[Message] = []
    try:
        c.subscribe([topic])
        deadline = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                out.append(m)
    finally:
        c.close()
    return out


def read_to_end(bootstrap: str, topic: str, timeout: float = 20.0) -> list[Message]:
    """Every record of ``topic``: read (assigned, no group) until each partition's end."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    out: list[Message] = []
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        pending = set(parts)
        deadline = time.monotonic() + timeout
        while pending:
            assert time.monotonic() < deadline, f"{topic}: no end of partitions {pending}"
            m = c.poll(0.2)
            if m is None:
                continue
            err = m.error()
            if err is not None and err.code() == KafkaError._PARTITION_EOF:
                pending.discard(m.partition() or 0)
            elif err is None:
                out.append(m)
    finally:
        c.close()
    return out


def sink_settings(
    bootstrap: str, tmp: Path, customers: Customers, name: str, partitions: int = 3
) -> Settings:
    """Settings for a sink given ``customers`` in memory: its own topics (created) on the
    broker, data dir under ``tmp``, API port and operator token file."""
    prefix = f"{name}-{uuid.uuid4().hex[:8]}"
    s = Settings(
        config=Path("/nonexistent"),  # customers are given in memory
        data_dir=tmp / "data",
        kafka_bootstrap=bootstrap,
        raw_topic=f"{prefix}.raw",
        redacted_topic=f"{prefix}.redacted",
        deadletter_topic=f"{prefix}.deadletter",
        partitions=partitions,
        api_port=free_port(),
        operator_token_file=tmp / "data" / "operator-token",
    )
    ensure_topics(s, customers.shortest_retention_days)
    return s


def settings_env(settings: Settings) -> dict[str, str]:
    env = settings.to_env(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Stage:
    """A pipeline stage running as a subprocess, its output captured for assertions."""

    child: Spawned
    lines: list[str] = field(default_factory=list)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.child.proc

    @property
    def output(self) -> str:
        return "".join(self.lines)


@contextmanager
def run_stage(
    module: str,
    settings: Settings,
    ready_text: str,
    timeout: float = 60.0,
    args: Sequence[str] = (),
) -> Iterator[Stage]:
    lines: list[str] = []
    child = Spawned(
        [sys.executable, "-m", module, *args],
        ready_text=ready_text,
        env=settings_env(settings),
        on_line=lines.append,
    )
    stage = Stage(child, lines)
    try:
        if not child.wait_ready(timeout):
            raise RuntimeError(f"{module} did not become ready:\n{stage.output[-3000:]}")
        yield stage
    finally:
        child.stop(15, pump_timeout=5)


def files_containing(root: Path, needle: bytes) -> list[Path]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            try:
                if needle in path.read_bytes():
                    hits.append(path)
            except OSError:
                pass
    return hits
