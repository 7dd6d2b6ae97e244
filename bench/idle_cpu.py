"""How much CPU an idle `mailmeta up` uses, per part (Linux /proc).

.venv/bin/python bench/idle_cpu.py [--seconds 20] [--broker kafka|tansu|kafka,tansu]

With both brokers, one `mailmeta up` after the other, same measure. The brokers alone:
``bench/kafka_facts.py --only idle``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _brokers import parse_kinds
from _report import header, loadavg

from mailmeta.local.process import Spawned, free_port

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--settle", type=float, default=10)
    ap.add_argument("--broker", "--brokers", default="kafka", help="kafka, tansu or both")
    args = ap.parse_args()
    header()
    try:
        kinds = parse_kinds(args.broker, ("kafka", "tansu"))
    except ValueError as exc:
        ap.error(str(exc))
    for kind in kinds:
        measure(kind, args.settle, args.seconds)


def measure(broker: str, settle: float, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lines: list[str] = []
        child = Spawned(
            [sys.executable, "-m", "mailmeta", "up", "--data-dir", tmp,
             "--smtp-port", str(free_port()), "--api-port", str(free_port()),
             "--broker-port", str(free_port()), "--broker", broker],
            ready_text="mailmeta is up", on_line=lines.append,
        )  # fmt: skip
        try:
            if not child.wait_ready(240):
                raise SystemExit("mailmeta up did not start:\n" + "".join(lines))
            parts = {"supervisor": child.pid}
            for line in lines:
                if " pid " in line:
                    parts[line.split()[0]] = int(line.split(" pid ")[1].split()[0])
            time.sleep(settle)
            before = {n: cpu_seconds(p) for n, p in parts.items()}
            time.sleep(seconds)
            after = {n: cpu_seconds(p) for n, p in parts.items()}
        finally:
            child.stop(40)  # by PID: it drains and stops its parts by PID
    total = 0.0
    print(f"mailmeta up --broker {broker}: idle CPU over {seconds:.0f} s (percent of one core):")
    for name in parts:
        pct = 100 * (after[name] - before[name]) / seconds
        total += pct
        print(f"  {name:<11} {pct:5.1f} %")
    print(f"  {'total':<11} {total:5.1f} %   ({loadavg()})")


if __name__ == "__main__":
    main()
