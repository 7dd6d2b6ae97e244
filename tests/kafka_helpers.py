"""Reusable test helpers: wait for a condition, consume a topic with bounded waits, run a stage
as a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer, Message, Producer

from mailmeta.config import Customers, Settings
from mailmeta.kafka import ensure_topics
from mailmeta.local.brokers import free_port

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
    env = dict(os.environ)
    for key, value in settings.model_dump().items():
        env[f"MAILMETA_{key.upper()}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Stage:
    """A pipeline stage running as a subprocess, its output captured for assertions."""

    proc: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

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
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=settings_env(settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    stage = Stage(proc)

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            stage.lines.append(line)
            if ready_text in line:
                stage._ready.set()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + timeout
        while not stage._ready.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{module} did not become ready:\n{stage.output[-3000:]}")
        yield stage
    finally:
        stop_process(proc)
        t.join(5)
        if proc.stdout is not None:
            proc.stdout.close()


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


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
