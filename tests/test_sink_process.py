"""``python -m mailmeta.service`` as a process: ready line, SIGTERM, restart, data-dir lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from mailmeta.config import Settings, load_customers
from mailmeta.schema import Event, encode_event
from tests.event_helpers import Redacted
from tests.kafka_helpers import produce, settings_env

READY = "mailmeta sink: API listening on "


@dataclass
class SinkProcess:
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    stdout_lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; the exit code and how long the exit took."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - start


@contextmanager
def sink_process(env: dict[str, str], log: Path, wait_ready: bool = True) -> Iterator[SinkProcess]:
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailmeta.service"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    sp = SinkProcess(proc, log)

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            sp.stdout_lines.append(line)
            if line.startswith(READY):
                sp.ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        if wait_ready:
            deadline = time.monotonic() + 30
            while not sp.ready.wait(0.1):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"sink did not become ready:\n{sp.stderr[-3000:]}")
        yield sp
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        reader.join(5)
        if proc.stdout is not None:
            proc.stdout.close()


def demo_events(settings: Settings, n: int) -> list[Event]:
    """Raw events of the example config's customer, redacted by its policy."""
    rows = Redacted(load_customers(settings.config, settings.region))
    return [rows("demo", status="accepted", subject=f"message {i}") for i in range(n)]


def wait_visible(
    url: str, ids: set[str], token_file: Path | None, timeout: float = 20.0
) -> list[dict[str, object]]:
    assert token_file is not None  # the sink writes the operator token there on start
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/v1/messages", params={"customer": "demo"}, headers=headers, timeout=5)
        got = r.json()["messages"] if r.status_code == 200 else []
        if ids <= {m["event_id"] for m in got}:
            return got  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"events not visible within {timeout}s: {r.status_code} {r.text}")
        time.sleep(0.2)


def test_config_error_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "customers.yaml"
    bad.write_text("customers:\n  - id: x\n    domains: [x.example]\n    retention_days: 0\n")
    env = dict(os.environ, MAILMETA_CONFIG=str(bad), MAILMETA_DATA_DIR=str(tmp_path / "d"))
    done = subprocess.run(
        [sys.executable, "-m", "mailmeta.service"], env=env, capture_output=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stdout == b""
    assert str(bad).encode() in done.stderr and b"retention_days" in done.stderr


@pytest.mark.slow
def test_serves_stops_on_sigterm_and_keeps_rows_across_restart(
    settings: Settings, tmp_path: Path
) -> None:
    env = settings_env(settings)
    url = f"http://{settings.api_host}:{settings.api_port}"
    events = demo_events(settings, 3)
    with sink_process(env, tmp_path / "first.log") as first:
        assert first.stdout_lines == [f"{READY}{url}\n"]
        assert httpx.get(f"{url}/healthz", timeout=5).json()["status"] == "ok"
        produce(
            settings.kafka_bootstrap, settings.redacted_topic, [encode_event(e) for e in events]
        )
        wait_visible(url, {e.event_id for e in events}, settings.operator_token_file)

        # One process owns a chdb directory: a second sink on it refuses to start.
        other = dict(env, MAILMETA_API_PORT=str(settings.api_port + 1))
        second = subprocess.run(
            [sys.executable, "-m", "mailmeta.service"], env=other, capture_output=True, timeout=30
        )
        assert second.returncode == 1
        assert b"cannot start" in second.stderr

        code, took = first.terminate(timeout=10)
        assert code == 0, first.stderr[-3000:]
        assert took < 8
        assert first.stdout_lines == [f"{READY}{url}\n"]

    with sink_process(env, tmp_path / "second.log") as again:
        got = wait_visible(url, {e.event_id for e in events}, settings.operator_token_file)
        assert len(got) == len(events)  # nothing consumed twice shows twice
        code, _ = again.terminate(timeout=10)
        assert code == 0, again.stderr[-3000:]
