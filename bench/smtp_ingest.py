"""SMTP ingest throughput: mailmeta's front end vs a bare aiosmtpd server, same load, one run.

    .venv/bin/python bench/smtp_ingest.py [-n 5000] [--sessions 20] [--size 1024] [--rounds 3]
        [--brokers kafka,tansu] [--workers 1,2] [--kafka-jvm up|throughput]

(a) ``python -m mailmeta.ingest`` producing to a local broker (250 only after the broker
    acknowledged), one process and ``--workers 2``, on each broker of ``--brokers``: Apache
    Kafka as ``mailmeta up`` runs it (durable) and/or the memory-only Tansu, side by side, so
    the cost of durability is the Kafka / Tansu ratio; (b) a bare aiosmtpd server whose
    handler parses the headers with email.parser (default asyncio loop). All are driven by
    Postfix's smtp-source, one message per connection, in alternating rounds (the machine
    is shared: figures are medians, compare the ratios). Every process started here is
    stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _brokers import JVM_CHOICES, BenchBroker, parse_kinds
from _report import header, loadavg

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


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (the workers of ``--workers N``)."""
    total = 0.0
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=200, help="messages sent first, not timed")
    ap.add_argument("--brokers", default="kafka,tansu", help="comma-separated: kafka, tansu")
    ap.add_argument("--workers", default="1,2", help="comma-separated --workers values to run")
    ap.add_argument("--kafka-jvm", choices=JVM_CHOICES, default="up",
                    help="up: the JVM options `mailmeta up` uses; throughput: full JIT")  # fmt: skip
    ap.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    header()
    if args.baseline_server:
        _baseline_server(args.baseline_server)
        return 0
    try:
        kinds = parse_kinds(args.brokers, ("kafka", "tansu"))
        worker_counts = [int(w) for w in args.workers.split(",")]
    except ValueError as exc:
        ap.error(str(exc))
    if not SMTP_SOURCE.exists():
        print(f"{SMTP_SOURCE} missing: run tests/tools/fetch.sh .tools", file=sys.stderr)
        return 2

    from mailmeta.config import Settings, load_customers
    from mailmeta.kafka import ensure_topics
    from mailmeta.local.process import free_port

    procs: list[subprocess.Popen[str]] = []
    data_dir = tempfile.TemporaryDirectory(prefix="mailmeta-bench-")
    brokers = [BenchBroker(k, Path(data_dir.name) / k, jvm=args.kafka_jvm) for k in kinds]
    try:
        print(f"machine: {loadavg()}")
        servers: dict[str, int] = {}
        pids: dict[str, int] = {}
        topics: dict[str, tuple[str, str]] = {}  # server name -> (bootstrap, topic)
        broker_pid: dict[str, int] = {}  # server name -> its broker's pid

        def start(name: str, argv: list[str], env: dict[str, str] | None, port: int) -> None:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            print(f"{name}: {_wait_line(proc, 60)}")
            servers[name] = port
            pids[name] = proc.pid

        base_port = free_port()
        start("bare aiosmtpd", [sys.executable, __file__, "--baseline-server", str(base_port)],
              None, base_port)  # fmt: skip
        for broker in brokers:
            t0 = time.monotonic()
            broker.start()
            print(f"{broker.label}: ready in {time.monotonic() - t0:.1f} s on {broker.bootstrap}")
            topic = f"bench-{uuid.uuid4().hex[:8]}.raw"
            settings = Settings(
                kafka_bootstrap=broker.bootstrap,
                kafka_single_node=True,  # one local broker, on purpose (as `mailmeta up`)
                raw_topic=topic,
                redacted_topic=topic.replace(".raw", ".redacted"),
                deadletter_topic=topic.replace(".raw", ".deadletter"),
            )
            ensure_topics(settings, load_customers(settings.config).shortest_retention_days)
            for workers in worker_counts:
                port = free_port()
                env = dict(
                    os.environ,
                    MAILMETA_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
                    MAILMETA_KAFKA_SINGLE_NODE="true",
                    MAILMETA_RAW_TOPIC=topic,
                    MAILMETA_SMTP_HOST="127.0.0.1",
                    MAILMETA_SMTP_PORT=str(port),
                    MAILMETA_DATA_DIR=f"{data_dir.name}/{broker.kind}-w{workers}",
                    MAILMETA_LOG_LEVEL="warning",  # one INFO line per message would cost throughput
                    # smtp-source opens every connection from 127.0.0.1.
                    MAILMETA_SMTP_MAX_CONNECTIONS_PER_IP="1000",
                )
                name = f"ingest -w{workers} on {broker.kind}"
                start(name, [sys.executable, "-m", "mailmeta.ingest", "--workers", str(workers)],
                      env, port)  # fmt: skip
                topics[name] = (broker.bootstrap, topic)
                broker_pid[name] = broker.pid or 0

        n, s, size = args.messages, args.sessions, args.size
        print(f"load: smtp-source -s {s} -m {n} -l {size} (one message per connection), "
              f"{args.rounds} rounds")  # fmt: skip
        rates: dict[str, list[float]] = {name: [] for name in servers}
        cpu: dict[str, list[float]] = {name: [] for name in servers}
        broker_cpu: dict[str, list[float]] = {name: [] for name in broker_pid}
        sent = dict.fromkeys(servers, 0)
        for name, port in servers.items():
            if args.warmup:
                _smtp_source(port, args.warmup, s, size)
                sent[name] += args.warmup
        for r in range(args.rounds):
            for name, port in servers.items():
                c0 = _cpu_seconds(pids[name])
                b0 = _cpu_seconds(broker_pid[name]) if name in broker_pid else 0.0
                elapsed = _smtp_source(port, n, s, size)
                us = (_cpu_seconds(pids[name]) - c0) / n * 1e6
                rates[name].append(n / elapsed)
                cpu[name].append(us)
                sent[name] += n
                line = f"  round {r + 1} {name:>22}: {n / elapsed:8.0f} msg/s {us:6.0f} CPU-us/msg"
                if name in broker_pid:
                    # The broker's CPU for this round's messages (rounds run one at a time).
                    bus = (_cpu_seconds(broker_pid[name]) - b0) / n * 1e6
                    broker_cpu[name].append(bus)
                    line += f" + broker {bus:5.0f}"
                print(line)
        base = statistics.median(rates["bare aiosmtpd"])
        base_cpu = statistics.median(cpu["bare aiosmtpd"])
        print(
            f"{'server':>24} {'msg/s (median)':>15} {'vs bare':>8} {'CPU-us/msg':>11} {'vs bare':>8}"
        )
        for name, values in rates.items():
            med, c = statistics.median(values), statistics.median(cpu[name])
            print(f"{name:>24} {med:15.0f} {med / base:7.2f}x {c:11.0f} {c / base_cpu:7.2f}x")
        if "kafka" in kinds and "tansu" in kinds:
            for w in worker_counts:
                k = statistics.median(rates[f"ingest -w{w} on kafka"])
                t = statistics.median(rates[f"ingest -w{w} on tansu"])
                lower = 100 * (1 - k / t)
                print(
                    f"durability cost, --workers {w}: Kafka / Tansu = {k / t:.2f}, Kafka "
                    f"{abs(lower):.0f} % {'lower' if lower > 0 else 'higher'} (target: <= 10 % lower)"
                )
        for kind in kinds:
            bus = [x for name, xs in broker_cpu.items() if name.endswith(kind) for x in xs]
            print(f"broker CPU per message, {kind}: median {statistics.median(bus):.0f} us")
        print(f"machine after the run: {loadavg()}")
        ok = True
        for bootstrap, topic in dict.fromkeys(topics.values()):
            expected = sum(sent[name] for name, bt in topics.items() if bt == (bootstrap, topic))
            events = _count_events(bootstrap, topic)
            print(f"events on {topic}: {events} (expected {expected})")
            ok = ok and events == expected
        return 0 if ok else 1
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for broker in brokers:
            broker.stop()
        data_dir.cleanup()


if __name__ == "__main__":
    sys.exit(main())
