"""SMTP ingest throughput: mailmeta's front end vs a bare aiosmtpd server, same load, one run.

    .venv/bin/python bench/smtp_ingest.py [-n 5000] [--sessions 20] [--size 1024]

(a) ``python -m mailmeta.ingest`` producing to a local Tansu broker (250 only after the
    broker acknowledged), (b) a bare aiosmtpd server whose handler parses the headers with
    email.parser (default asyncio loop). Both are driven by Postfix's smtp-source, one
    message per connection. Every process started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / ".tools" / "usr"
SMTP_SOURCE = TOOLS / "sbin" / "smtp-source"
RCPT = "rcpt@demo.example"


# --- (b) the baseline server, run as a subprocess of this script --------------------------


def _baseline_server(port: int) -> None:
    from email.parser import BytesHeaderParser

    from aiosmtpd.smtp import SMTP, Envelope, Session

    parser = BytesHeaderParser()

    class Handler:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            msg = parser.parsebytes(envelope.original_content or b"", headersonly=True)
            msg.get("Subject"), msg.get("Message-ID"), msg.get("Date")
            return "250 2.0.0 Ok"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        handler = Handler()
        # A fixed hostname, as mailmeta does: otherwise aiosmtpd does a DNS lookup
        # (socket.getfqdn) per connection and the comparison would flatter mailmeta.
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="baseline.local", loop=loop), "127.0.0.1", port
        )
        print(f"baseline listening on 127.0.0.1:{port}", flush=True)
        await stop.wait()
        server.close()

    asyncio.run(main())


# --- driver ------------------------------------------------------------------------------


def _wait_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"process {proc.pid} printed nothing within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"process {proc.pid} exited with {proc.wait(5)}")
    return line.strip()


def _stop(proc: subprocess.Popen[str] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _smtp_source(port: int, messages: int, sessions: int, size: int) -> float:
    """Seconds smtp-source took to deliver ``messages`` (one per connection)."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(TOOLS / "lib" / "postfix"))
    cmd = [
        str(SMTP_SOURCE),
        "-s", str(sessions),
        "-m", str(messages),
        "-l", str(size),
        "-M", "bench.client",
        "-f", "sender@example.org",
        "-t", RCPT,
        f"127.0.0.1:{port}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0 or res.stderr.strip():
        raise RuntimeError(f"smtp-source failed ({res.returncode}): {res.stderr.strip()[:500]}")
    return elapsed


def _count_events(bootstrap: str, topic: str, timeout: float = 60.0) -> int:
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        parts = sorted(consumer.list_topics(topic, timeout=5).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        count, at_end = 0, set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(parts) and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                err = msg.error()
                if err is None:
                    count += 1
                    at_end.discard(msg.partition())
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
        return count
    finally:
        consumer.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=200, help="messages sent first, not timed")
    ap.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_server:
        _baseline_server(args.baseline_server)
        return 0
    if not SMTP_SOURCE.exists():
        print(f"{SMTP_SOURCE} missing: run tests/tools/fetch.sh .tools", file=sys.stderr)
        return 2

    from mailmeta.config import Settings, load_customers
    from mailmeta.kafka import ensure_topics
    from mailmeta.local.brokers import LocalBroker, free_port

    broker = LocalBroker("tansu", free_port())
    ingest: subprocess.Popen[str] | None = None
    baseline: subprocess.Popen[str] | None = None
    try:
        broker.start()
        topic = f"bench-{uuid.uuid4().hex[:8]}.raw"
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            raw_topic=topic,
            redacted_topic=topic.replace(".raw", ".redacted"),
            deadletter_topic=topic.replace(".raw", ".deadletter"),
            smtp_port=free_port(),
        )
        ensure_topics(settings, load_customers(settings.config).shortest_retention_days)
        env = dict(
            os.environ,
            MAILMETA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
            MAILMETA_RAW_TOPIC=topic,
            MAILMETA_SMTP_HOST="127.0.0.1",
            MAILMETA_SMTP_PORT=str(settings.smtp_port),
            MAILMETA_LOG_LEVEL="warning",  # one INFO line per message would cost throughput
        )
        ingest = subprocess.Popen(
            [sys.executable, "-m", "mailmeta.ingest"], env=env, stdout=subprocess.PIPE, text=True
        )
        print(_wait_line(ingest, 30))
        base_port = free_port()
        baseline = subprocess.Popen(
            [sys.executable, __file__, "--baseline-server", str(base_port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        print(_wait_line(baseline, 30))

        n, s, size = args.messages, args.sessions, args.size
        print(f"load: smtp-source -s {s} -m {n} -l {size} (one message per connection)")
        results: dict[str, float] = {}
        for name, port in (("bare aiosmtpd", base_port), ("mailmeta ingest", settings.smtp_port)):
            if args.warmup:
                _smtp_source(port, args.warmup, s, size)
            elapsed = _smtp_source(port, n, s, size)
            results[name] = n / elapsed
            print(f"{name:>16}: {n} messages in {elapsed:6.2f} s = {results[name]:8.0f} msg/s")
        events = _count_events(broker.bootstrap, topic)
        expected = n + args.warmup
        print(f"events on {topic}: {events} (expected {expected})")
        ratio = results["mailmeta ingest"] / results["bare aiosmtpd"]
        print(f"ratio mailmeta / bare aiosmtpd: {ratio:.2f}")
        return 0 if events == expected else 1
    finally:
        _stop(baseline)
        _stop(ingest)
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
