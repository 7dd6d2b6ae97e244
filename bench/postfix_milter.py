"""What mailmeta's Postfix integration costs Postfix: a real Postfix (Debian's package in
.tools/, tests/postfix_helpers.py) driven by smtp-source, alone and then with the read-only
milter and the log follower attached (producing to a local Apache Kafka); same load, one run
each. The goal: >= 0.9x of Postfix alone, and the events of every accepted message present.

    .venv/bin/python bench/postfix_milter.py [-n 2000] [--sessions 20] [--size 1024]

Postfix delivers with ``default_transport = discard`` (the log still says ``status=sent``),
so the figure is Postfix's acceptance rate, smtpd -> cleanup -> queue. Needs root (Postfix's
mail owner). Every process started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _brokers import BenchBroker
from _report import header
from smtp_ingest import SMTP_SOURCE, _count_events, _cpu_seconds, _smtp_source, _stop, _wait_line

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the test harness's Postfix: one way to run it

from tests.postfix_helpers import Postfix, available  # noqa: E402

DISCARD = {"default_transport": "discard", "smtpd_client_connection_count_limit": "0"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--answer-within", default="0", help="the milter's --answer-within")
    ap.add_argument("--parts", default="milter,maillog", help="what to attach (comma-separated)")
    args = ap.parse_args()
    header()
    if not SMTP_SOURCE.exists() or not available():
        print("needs root and .tools (tests/tools/fetch.sh .tools)", file=sys.stderr)
        return 2

    from mailmeta.config import Settings, load_customers
    from mailmeta.kafka import ensure_topics
    from mailmeta.local.process import free_port

    n, s, size = args.messages, args.sessions, args.size
    work = tempfile.TemporaryDirectory(prefix="mailmeta-bench-")
    procs: list[subprocess.Popen[str]] = []
    try:
        print(f"load: smtp-source -s {s} -m {n} -l {size} (one message per connection)")
        with BenchBroker("kafka", Path(work.name) / "broker") as broker:
            # The broker runs in both runs: the same machine load, only the attachment differs.
            with Postfix(relayhost="127.0.0.1:9", extra=DISCARD) as pf:
                _smtp_source(pf.port, min(200, n), s, size)  # warm-up, not timed
                alone = n / _smtp_source(pf.port, n, s, size)
            print(f"Postfix alone:                      {alone:8.0f} msg/s")
            topic = f"bench-{uuid.uuid4().hex[:8]}.raw"
            settings = Settings(
                kafka_bootstrap=broker.bootstrap,
                kafka_single_node=True,
                raw_topic=topic,
                redacted_topic=topic.replace(".raw", ".redacted"),
                deadletter_topic=topic.replace(".raw", ".deadletter"),
            )
            ensure_topics(settings, load_customers(settings.config).shortest_retention_days)
            env = dict(
                os.environ,
                MAILMETA_KAFKA_BOOTSTRAP=broker.bootstrap,
                MAILMETA_KAFKA_SINGLE_NODE="true",
                MAILMETA_RAW_TOPIC=topic,
                MAILMETA_DATA_DIR=f"{work.name}/data",
                MAILMETA_LOG_LEVEL="warning",
            )
            port = free_port()
            milter = f"{{ inet:127.0.0.1:{port}, connect_timeout=10s, default_action=accept }}"
            attach = milter if "milter" in args.parts else None
            with Postfix(relayhost="127.0.0.1:9", milter=attach, extra=DISCARD) as pf:
                parts = args.parts.split(",")
                argvs = {
                    "milter": [
                        "milter",
                        "--port",
                        str(port),
                        "--answer-within",
                        args.answer_within,
                    ],
                    "maillog": ["maillog", "--file", str(pf.maillog)],
                }
                for argv in (argvs[p] for p in parts):
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "mailmeta", *argv],
                        env=env,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    procs.append(proc)
                    print(f"  {_wait_line(proc, 60)}")
                warm = min(200, n)
                _smtp_source(pf.port, warm, s, size)
                cpu0 = {p: _cpu_seconds(proc.pid) for p, proc in zip(parts, procs, strict=True)}
                attached = n / _smtp_source(pf.port, n, s, size)
                cpu = {
                    p: (_cpu_seconds(proc.pid) - cpu0[p]) / n * 1e6
                    for p, proc in zip(parts, procs, strict=True)
                }
                print(f"Postfix + {' + '.join(parts):<25} {attached:8.0f} msg/s"
                      f"  ({attached / alone:.2f}x)")  # fmt: skip
                for p, us in cpu.items():
                    print(f"  {p}: {us:.0f} µs CPU per message while timed")
                # accepted (milter) and/or delivered (log), per message
                expected = len(parts) * (warm + n)
                t0 = time.monotonic()
                count = 0
                while time.monotonic() - t0 < 180:
                    count = _count_events(broker.bootstrap, topic, timeout=30)
                    if count >= expected:
                        break
                    time.sleep(1)  # the queue drains at Postfix's pace
                print(f"events on the raw topic: {count} of {expected} "
                      f"({' + '.join(parts)} for {warm + n} messages)")  # fmt: skip
                for proc in procs:
                    _stop(proc)
        return 0 if count == expected else 1
    finally:
        for proc in procs:
            _stop(proc)
        work.cleanup()


if __name__ == "__main__":
    sys.exit(main())
