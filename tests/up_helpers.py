"""`mailmeta up` as a subprocess for tests: started on free loopback ports, stopped by PID."""

from __future__ import annotations

import itertools
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.header import Header
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from mailmeta.local.process import Spawned, free_port
from tests.conftest import EXAMPLE_CONFIG, REPO

TOOLS = REPO / ".tools"
SWAKS = TOOLS / "usr" / "bin" / "swaks"
SMTP_SOURCE = TOOLS / "usr" / "sbin" / "smtp-source"
MAILMETA = [sys.executable, "-m", "mailmeta"]


def need_tools() -> None:
    if not (SWAKS.exists() and SMTP_SOURCE.exists()):
        if os.environ.get("CI"):
            pytest.fail("SMTP tools missing: run tests/tools/fetch.sh .tools (make test does)")
        pytest.skip("run tests/tools/fetch.sh .tools for swaks and smtp-source")


@dataclass
class Up:
    child: Spawned
    smtp_port: int
    api_port: int
    data_dir: Path
    lines: list[str] = field(default_factory=list)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.child.proc

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def pids(self) -> list[int]:
        """Every process `mailmeta up` said it started (restarts included)."""
        out = []
        for line in self.lines:
            for marker in (" pid ", "restarted, pid "):
                if marker in line:
                    out.append(int(line.split(marker)[1].split()[0].rstrip(",")))
                    break
        return out

    def part_pid(self, name: str) -> int:
        """The newest PID of a part ("broker", "sink", "streams", "ingest")."""
        found = [
            int(line.split(" pid ")[1].split()[0])
            for line in self.lines
            if line.strip().startswith(name) and " pid " in line
        ]
        assert found, f"no pid printed for {name}:\n{self.output[-2000:]}"
        return found[-1]

    def kill_part(self, name: str) -> None:
        """SIGKILL one part ("broker", "sink", "streams", "ingest") by its PID."""
        os.kill(self.part_pid(name), signal.SIGKILL)

    def kill_tree(self) -> None:
        """SIGKILL the supervisor and every part at once, as an OOM kill or power loss would."""
        for pid in [self.proc.pid, *self.pids()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        for pid in self.pids():
            assert_gone(pid)

    def wait_line(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline, (
                f"no {text!r} within {timeout}s:\n{self.output[-3000:]}"
            )
            time.sleep(0.1)

    def stats_total(self, customer: str = "demo") -> int:
        r = httpx.get(
            f"{self.api}/v1/stats",
            params={"customer": customer, "days": "1"},
            headers=self.headers,
            timeout=10,
        )
        r.raise_for_status()
        return sum(int(v["messages"]) for v in r.json()["totals"].values())

    @property
    def headers(self) -> dict[str, str]:
        """`mailmeta up` requires API tokens: use the operator token it wrote for us."""
        token = (self.data_dir / "operator-token").read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def messages_response(self, customer: str = "demo", **params: str) -> httpx.Response:
        return httpx.get(
            f"{self.api}/v1/messages",
            params={"customer": customer, **params},
            headers=self.headers,
            timeout=10,
        )

    def messages(self, customer: str = "demo", **params: str) -> list[dict[str, object]]:
        r = self.messages_response(customer, **params)
        r.raise_for_status()
        return r.json()["messages"]  # type: ignore[no-any-return]

    def all_messages(self, customer: str = "demo") -> list[dict[str, object]]:
        """Every visible row, through the API's cursor pages."""
        rows: list[dict[str, object]] = []
        cursor: str | None = None
        while True:
            params = {
                "customer": customer,
                "limit": "1000",
                **({"cursor": cursor} if cursor else {}),
            }
            r = httpx.get(
                f"{self.api}/v1/messages", params=params, headers=self.headers, timeout=30
            )
            r.raise_for_status()
            body = r.json()
            rows += body["messages"]
            cursor = body.get("next")
            if not cursor:
                return rows

    def wait_messages(
        self, n: int, timeout: float = 30.0, **params: str
    ) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            rows = self.messages(**params)
            if len(rows) >= n:
                return rows
            time.sleep(0.3)
        raise AssertionError(f"expected {n} messages, have {len(rows)}:\n{self.output[-3000:]}")

    def stop(self, timeout: float = 20.0) -> float:
        """SIGTERM; returns how long the shutdown took."""
        t0 = time.monotonic()
        self.child.stop(timeout, pump_timeout=5)
        return time.monotonic() - t0


@contextmanager
def mailmeta_up(
    data_dir: Path,
    *extra: str,
    config: Path = EXAMPLE_CONFIG,
    env: dict[str, str] | None = None,
    region_port_step: int | None = None,
    cwd: Path | None = None,
) -> Iterator[Up]:
    """``region_port_step``: the config has regions; each port p is chosen with p + step free
    too (the next region's), and passed on as --region-port-step. ``cwd``: run from there."""
    # Each port p with p + step free too: the next region's cell takes it.
    offsets = (region_port_step,) if region_port_step else ()
    smtp_port, api_port = free_port(*offsets), free_port(*offsets)
    if region_port_step:
        extra = (*extra, "--region-port-step", str(region_port_step))
    argv = [
        *MAILMETA, "up",
        "--config", str(config),
        "--data-dir", str(data_dir),
        "--smtp-port", str(smtp_port),
        "--api-port", str(api_port),
        *extra,
    ]  # fmt: skip
    if "--kafka-bootstrap" not in extra and "--broker-port" not in extra:
        argv += ["--broker-port", str(free_port(*offsets))]
    lines: list[str] = []
    child = Spawned(
        argv,
        ready_text="mailmeta is up",
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=cwd,
        on_line=lines.append,
    )
    up = Up(child, smtp_port, api_port, data_dir, lines)
    try:
        if not child.wait_ready(120):
            raise AssertionError(f"mailmeta up did not start:\n{up.output[-4000:]}")
        yield up
    finally:
        up.stop()
        for pid in up.pids():  # nothing left behind, even when the test failed
            assert_gone(pid)


def assert_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie of ours would still answer: reap it if it is our child.
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still running after mailmeta up stopped")


def send_smtplib(port: int, canary: str, subject: str = "Grüße aus Köln") -> str:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@sender.example>"
    msg["To"] = "jane@demo.example"
    msg["Subject"] = Header(subject, "utf-8").encode()
    msg["Date"] = "Sun, 22 Nov 2026 10:00:00 +0100"
    msg_id = f"<{uuid.uuid4().hex}@sender.example>"
    msg["Message-ID"] = msg_id
    msg["X-Secret"] = canary
    msg.set_content(f"Body with the canary {canary}\n")
    with smtplib.SMTP("127.0.0.1", port, local_hostname="mx.sender.example", timeout=30) as s:
        s.send_message(msg, from_addr="alice@sender.example", to_addrs=["jane@demo.example"])
    return msg_id


def message(i: int) -> tuple[str, EmailMessage]:
    mid = f"<{uuid.uuid4().hex}.{i}@sender.example>"
    m = EmailMessage()
    m["From"] = "alice@sender.example"
    m["To"] = "jane@demo.example"
    m["Subject"] = f"durable {i}"
    m["Message-ID"] = mid
    m.set_content("body\n")
    return mid, m


def send_batch(port: int, n: int, connections: int = 4) -> list[str]:
    """``n`` mails over several SMTP connections; the Message-IDs of those answered 250."""
    acked: list[str] = []
    per = n // connections
    for c in range(connections):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            for i in range(per):
                mid, m = message(c * per + i)
                s.send_message(m, from_addr="alice@sender.example", to_addrs=["jane@demo.example"])
                acked.append(mid)  # send_message raises unless the reply was 250
    return acked


class Stream:
    """Mails sent one per connection by ``threads`` senders until stopped (or ``limit`` were
    tried); records what got 250 and what was refused (with its reply code)."""

    def __init__(self, port: int, *, threads: int = 1, limit: int | None = None) -> None:
        self.port = port
        self.limit = limit
        self.acked: list[str] = []
        self.refused: list[int] = []
        self._tried = itertools.count()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    @property
    def done(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        while not self._stop.is_set():
            i = next(self._tried)
            if self.limit is not None and i >= self.limit:
                return
            mid, m = message(i)
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as s:
                    s.send_message(
                        m, from_addr="alice@sender.example", to_addrs=["jane@demo.example"]
                    )
                self.acked.append(mid)
            except smtplib.SMTPResponseException as exc:
                self.refused.append(exc.smtp_code)
            except smtplib.SMTPRecipientsRefused as exc:
                self.refused.extend(code for code, _ in exc.recipients.values())
            except (OSError, smtplib.SMTPException):
                self.refused.append(0)  # no reply at all (the front end was down)
                self._stop.wait(0.05)

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def wait_done(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.done:
            assert time.monotonic() < deadline, f"senders not done: {len(self.acked)} acked"
            time.sleep(0.1)

    def wait_acked(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        target = len(self.acked) + n
        while len(self.acked) < target:
            assert time.monotonic() < deadline, f"only {len(self.acked)} acked, want {target}"
            time.sleep(0.05)


def assert_stored_once(up: Up, acked: list[str], timeout: float = 120.0) -> None:
    """Every acknowledged mail is stored, none twice: rows and the hourly stats."""
    deadline = time.monotonic() + timeout
    stored: list[str] = []
    while time.monotonic() < deadline:
        try:
            stored = [str(r["message_id"]) for r in up.all_messages()]
        except httpx.TransportError:  # the API's process is restarting
            time.sleep(0.5)
            continue
        if set(acked) <= set(stored):
            break
        time.sleep(0.5)
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged mails lost"
    assert len(stored) == len(set(stored)), "a mail is stored twice"
    # Stats may trail the rows by a moment; they must reach the count and never pass it.
    while up.stats_total() < len(stored) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert up.stats_total() == len(stored)


def dump_clickhouse(data_dir: Path) -> bytes:
    """Every row of every non-system table, read by a separate process (one owner per chdb dir)."""
    script = (
        "import sys, clickhouse_connect\n"
        "c = clickhouse_connect.get_client(dsn='chdb://' + sys.argv[1])\n"
        "out = []\n"
        'for db, t in c.query("SELECT database, name FROM system.tables WHERE database NOT IN '
        "('system','INFORMATION_SCHEMA','information_schema') AND engine NOT LIKE '%View%'\").result_rows:\n"
        "    out.append(c.raw_query(f'SELECT * FROM `{db}`.`{t}` FORMAT TSV'))\n"
        "c.close()\n"
        "sys.stdout.buffer.write(b'\\n'.join(out))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(data_dir / "clickhouse")],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return res.stdout


def broker_bootstrap(up: Up) -> str:
    """The address of the broker `mailmeta up` printed (its newest, after a restart)."""
    for line in reversed(up.lines):
        if line.strip().startswith("broker"):
            return next(w for w in line.split() if w.startswith("127.0.0.1:"))
    raise AssertionError("broker address not printed")
