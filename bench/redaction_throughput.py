"""Redaction throughput through a real broker: the faust worker vs a plain confluent loop.

Same events (~370 B), same policy (3 HMACs, a mask, an IP truncation), same transform code
(``streams.app.Transformer``), same broker, one run, one after the other (2 shared cores:
running them at once would measure the scheduler). Each candidate is a subprocess that
starts with N events waiting in its own raw topic; events/s is counted from its first
output record to its last as seen by a consumer here. Then the idle faust worker's CPU.
With several brokers (``--broker kafka,tansu``) the pair runs on each in turn, one run.
Apache Kafka is a single node as ``mailmeta up`` starts it, with the full JIT unless
``--kafka-jvm up`` (the broker's peak throughput is not what is measured here, but the
C1-only JIT of ``mailmeta up`` could cap it).

    .venv/bin/python bench/redaction_throughput.py [--events 100000]
        [--broker kafka|tansu|noida|kafka,tansu,...] [--kafka-jvm throughput|up]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from _brokers import JVM_CHOICES, BenchBroker, parse_kinds
from _report import header, loadavg
from confluent_kafka import Consumer, Producer
from pydantic import SecretStr

from mailmeta.config import Settings, load_customers
from mailmeta.kafka import ensure_topics
from mailmeta.schema import Event, encode_event, new_event_id, now_ms

CONFIG = """\
customers:
  - id: bench
    domains: [bench.example]
    retention_days: 30
    hmac_key: "bench-hmac-key-0123456789abcdef"
    policy:
      mail_from: hmac
      message_id: hmac
      helo: hmac
      rcpt_to: mask
      sender_ip: truncate_ip
      subject: keep
      date: keep
      size_bytes: keep
      smtp_reply: keep
      processing_ms: keep
      tls_version: keep
"""

PLAIN_LOOP = """
import json, sys, time
from collections import deque
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from mailmeta.config import Settings, load_customers
from mailmeta.policy import Redactor
from mailmeta.streams.app import Transformer

s = Settings()
t = Transformer(Redactor(load_customers(s.config)), s)
c = Consumer({"bootstrap.servers": s.kafka_bootstrap, "group.id": "plain-" + s.raw_topic,
              "auto.offset.reset": "earliest", "enable.auto.commit": False,
              "session.timeout.ms": 6000, **json.loads(sys.argv[1])})
p = Producer({"bootstrap.servers": s.kafka_bootstrap, "linger.ms": 5, "acks": "all",
              "enable.idempotence": True, "batch.size": 1 << 20,
              "partitioner": "murmur2_random"})
c.subscribe([s.raw_topic])
print("ready", flush=True)
# At-least-once as the faust worker: a batch's offsets are committed only once the broker
# acked all its outputs; batches are pipelined (batch N is committed, in order, once its
# deliveries are in, while N+1.. are processed) instead of a flush stall per batch.
pending = deque()  # (state [remaining, error], offsets to commit)

def batch_cb(state):
    def cb(err, msg):
        if err is not None:
            state[1] = err
        state[0] -= 1
    return cb

def commit_done():
    while pending and pending[0][0][0] == 0:
        state, offsets = pending.popleft()
        if state[1] is not None:
            raise KafkaException(state[1])
        c.commit(offsets=offsets, asynchronous=True)

while True:
    msgs = c.consume(1000, 0.05 if pending else 0.5)
    p.poll(0)
    commit_done()
    if not msgs:
        continue
    recs = [(m.key(), m.value(), m.partition(), m.offset()) for m in msgs if m.error() is None]
    out = t.transform(recs)
    state = [len(out), None]
    cb = batch_cb(state)
    for topic, key, value, part, headers in out:
        while True:
            try:
                p.produce(topic, value, key, partition=-1 if part is None else part,
                          headers=headers, on_delivery=cb)
                break
            except BufferError:
                p.poll(0.05)
    high = {}
    for m in msgs:
        high[(m.topic(), m.partition())] = m.offset() + 1
    pending.append((state, [TopicPartition(tp[0], tp[1], o) for tp, o in high.items()]))
    while len(pending) > 8:  # bound what is in flight
        p.poll(0.01)
        commit_done()
"""


def make_events(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        ev = Event(
            event_id=new_event_id(),
            received_at=now_ms(),
            customer_id="bench",
            status="accepted",
            sender_ip=f"198.51.{i % 250}.{i % 200 + 1}",
            helo="mx1.sender-domain.example",
            mail_from=f"newsletter+{i}@sender-domain.example",
            rcpt_to=[f"user{i % 977}@bench.example"],
            message_id=f"<{uuid.uuid4().hex}@sender-domain.example>",
            subject=f"Weekly digest #{i}",
            size_bytes=4000 + i % 5000,
            processing_ms=3.25,
            tls_version="TLSv1.3",
        )
        out.append(encode_event(ev))
    return out


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1 << 20})
    for v in values:
        while True:
            try:
                p.produce(topic, v, key=v[14:50])
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(60) == 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(name: str, argv: list[str], settings: Settings, n: int, idle_s: float) -> dict[str, float]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k, v in settings.model_dump().items():
        if isinstance(v, SecretStr):
            v = v.get_secret_value() or None
        if v is not None:  # unset optional settings stay unset (not the text "None")
            env[f"MAILMETA_{k.upper()}"] = str(v)
    c = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.subscribe([settings.redacted_topic])
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[bytes] = []
    threading.Thread(
        target=lambda: [lines.append(x) for x in iter(proc.stdout.readline, b"")],  # type: ignore[union-attr]
        daemon=True,
    ).start()
    got, first, last = 0, 0.0, 0.0
    try:
        cpu0 = cpu_seconds(proc.pid)
        deadline = time.monotonic() + 300
        while got < n and time.monotonic() < deadline and proc.poll() is None:
            for m in c.consume(10000, 0.5):
                if m.error() is None:
                    # The producer's timestamps: when the candidate produced, not when
                    # this (late-joining) consumer caught up.
                    ts = m.timestamp()[1] / 1000
                    got += 1
                    first = ts if got == 1 else min(first, ts)
                    last = max(last, ts)
        if got < n:
            raise RuntimeError(f"{name}: only {got}/{n} out:\n{b''.join(lines[-40:]).decode()}")
        busy_cpu = cpu_seconds(proc.pid) - cpu0
        time.sleep(2)  # let it settle (commits) before measuring idle
        c0 = cpu_seconds(proc.pid)
        time.sleep(idle_s)
        idle = (cpu_seconds(proc.pid) - c0) / idle_s
    finally:
        c.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    rate = (n - 1) / max(last - first, 1e-9)  # a tiny run may land in one fetch
    return {"rate": rate, "busy_cpu": busy_cpu, "idle_cpu_pct": idle * 100}


def compare(broker: BenchBroker, tmp: Path, events: list[bytes], idle_s: float) -> float:
    """The faust worker, then the plain loop, on ``broker``; returns faust / plain."""
    n = len(events)
    size = sum(map(len, events)) / n
    print(f"{n} events of ~{size:.0f} B on {broker.label}; policy: 3 hmac, mask, truncate_ip")
    # queued.min.messages=1000 helps on noida (DESIGN.md) but caps Tansu's fetches at
    # ~7k records/s (measured: 7,029/s with it, ~360k/s at librdkafka's default).
    plain_conf = {"queued.min.messages": 1000} if broker.kind == "noida" else {}
    results = {}
    for name, argv in (
        ("faust worker", [sys.executable, "-m", "mailmeta.streams"]),
        ("plain confluent loop", [sys.executable, "-c", PLAIN_LOOP, json.dumps(plain_conf)]),
    ):
        tag = uuid.uuid4().hex[:6]
        s = Settings(
            config=tmp / "customers.yaml",
            data_dir=tmp / tag,
            kafka_bootstrap=broker.bootstrap,
            kafka_single_node=True,  # one local broker, on purpose
            raw_topic=f"b{tag}.raw",
            redacted_topic=f"b{tag}.redacted",
            deadletter_topic=f"b{tag}.dead",
            policies_topic=f"b{tag}.policies",
        )
        ensure_topics(s, load_customers(s.config).shortest_retention_days)
        produce(s.kafka_bootstrap, s.raw_topic, events)
        results[name] = r = run(name, argv, s, n, idle_s)
        print(
            f"  {name:<22} {r['rate']:>9,.0f} ev/s   cpu while busy {r['busy_cpu']:.1f} s"
            f"   idle cpu {r['idle_cpu_pct']:.1f} %",
            flush=True,
        )
    ratio = results["faust worker"]["rate"] / results["plain confluent loop"]["rate"]
    print(f"  faust / plain = {ratio:.2f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument(
        "--broker", "--brokers", default="kafka", help="kafka, tansu, noida, or a comma list"
    )
    ap.add_argument("--kafka-jvm", choices=JVM_CHOICES, default="throughput")
    ap.add_argument("--idle", type=float, default=10.0)
    args = ap.parse_args()
    header()
    try:
        kinds = parse_kinds(args.broker)
    except ValueError as exc:
        ap.error(str(exc))
    tmp = Path(tempfile.mkdtemp(prefix="mm-bench-"))
    (tmp / "customers.yaml").write_text(CONFIG)
    print(f"machine: {loadavg()}")
    events = make_events(args.events)
    for kind in kinds:
        with BenchBroker(kind, tmp / kind, jvm=args.kafka_jvm) as broker:
            compare(broker, tmp, events, args.idle)
        print(f"machine: {loadavg()}")


if __name__ == "__main__":
    main()
