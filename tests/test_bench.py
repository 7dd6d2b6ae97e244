"""Every benchmark runs here at a tiny size, so a change that breaks one fails the suite.

The figures at these sizes mean nothing; what is checked is that each script runs to its end
on the real components, prints the command line and the machine's load first (so a figure can
be reproduced and judged), and prints its figures. The real sizes are run by hand (README).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.up_helpers import need_tools

BENCH = Path(__file__).resolve().parent.parent / "bench"

# script -> (tiny arguments, a line fragment its figures print)
TINY: dict[str, tuple[list[str], str]] = {
    "query_dashboard.py": (["--rows", "300", "--runs", "3"], "hourly stats, 7 days"),
    "sink_throughput.py": (["--rows", "300"], "rows/s"),
    "api_latency.py": (["--rows", "300", "--clients", "2", "--seconds", "1"], "req/s"),
    "redaction_throughput.py": (["--events", "300", "--idle", "1", "--brokers", "kafka"], "ev/s"),
    "smtp_ingest.py": (
        ["-n", "40", "--rounds", "1", "--warmup", "10", "--brokers", "kafka", "--workers", "1"],
        "msg/s",
    ),
    "e2e_latency.py": (
        ["--broker", "kafka", "--rate", "20", "--seconds", "2", "--warmup", "0"],
        "stored:",
    ),
    "postfix_milter.py": (["-n", "40", "--sessions", "4"], "msg/s"),
    "idle_cpu.py": (["--seconds", "1", "--settle", "1"], "total"),
    "kafka_facts.py": (
        ["--runs", "1", "--records", "200", "--idle", "1", "--settle", "1"],
        "idle",
    ),
}

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.timeout(600)]


def test_every_benchmark_has_a_tiny_run() -> None:
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(TINY), "give each bench/ script a tiny size in tests/test_bench.py"


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_at_a_tiny_size(script: str) -> None:
    need_tools()
    args, figure = TINY[script]
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=500,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
    )
    text = out.stdout
    assert out.returncode == 0, (text + out.stderr)[-4000:]
    lines = text.splitlines()
    assert lines[0].startswith("command: python ") and lines[0].endswith(
        f"{script} {' '.join(args)}"
    ), lines[:3]
    assert lines[1].startswith("machine: load average"), lines[:3]
    assert figure in text, text[-3000:]
