"""End-to-end latency of `mailmeta up`: SMTP ``250`` -> the row is visible through the API.

    .venv/bin/python bench/e2e_latency.py [--broker kafka,tansu] [--rate 1000] [--seconds 30]
        [--connections 20] [--sample 20] [--poll 0.05] [--size 1024] [--sink-wait-ms 500,50]

For each broker in turn (one run, same load), a fresh ``mailmeta up --broker B`` (default
settings, the bundled demo customer) gets a steady offered rate of mail for ``--seconds``:
an asyncio SMTP client on ``--connections`` persistent connections sends message ``i`` at
``t0 + i / rate`` (open loop: a slow server builds a backlog here, and the achieved rate says
so) and records when each ``250`` arrived. Postfix's smtp-source cannot be used: it paces only
in whole seconds per session and does not report when each message was acknowledged.

Every ``--sample``-th message is a probe (subject ``probe-<run>``, the others ``load-<run>``;
same size, same path). A separate process polls ``/v1/messages?customer=demo&subject=probe-<run>
&from=<oldest unseen probe - 2 s>`` every ``--poll`` s with the operator token, and notes when
each probe first appears; one request per poll for every probe in flight, so the measurement
adds little load. Latency = first response listing the row - the 250 (both CLOCK_MONOTONIC on
this machine): an upper bound, by up to one poll interval plus one API request. A warm-up
(``--warmup`` s at the same rate) runs first and is not counted. At the end every acknowledged
message must be stored exactly once (counted through the API's cursor pages).

``--sink-wait-ms A,B`` runs each broker once per value of ``MAILMETA_SINK_MAX_WAIT_MS`` (the
sink's batch wait; default: the setting's default), in turn, same load: old and new side by
side in one run. The sink's own metrics (``MAILMETA_SINK_METRICS_PORT``, scraped before and
after the measured load) give its inserts per second, rows per insert, insert time and its
share of the latency (redacted topic -> stored).

Exits non-zero, saying why, if `mailmeta up` does not start, a wait runs out (all bounded) or a
message is missing; `mailmeta up` is stopped by its PID (SIGTERM: it drains and stops its parts
by PID), then SIGKILL if it overstays.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
from _brokers import parse_kinds
from _report import header, loadavg
from prometheus_client.parser import text_string_to_metric_families

from mailmeta.local.process import Spawned, free_port

TICK = os.sysconf("SC_CLK_TCK")
RCPT = "user@demo.example"


class BenchError(RuntimeError):
    """A reason to stop the benchmark, printed as is."""


# --- mailmeta up ---------------------------------------------------------------------------


class Up:
    """``mailmeta up`` in a temporary data dir on free ports, stopped by PID."""

    def __init__(self, broker: str, data_dir: Path, sink_wait_ms: int | None = None) -> None:
        self.broker = broker
        self.data_dir = data_dir
        self.smtp_port, self.api_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        metrics_port = free_port()
        self.metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        # `mailmeta up` passes its environment on to its parts: the sink reads these.
        self.env = dict(os.environ, MAILMETA_SINK_METRICS_PORT=str(metrics_port))
        if sink_wait_ms is not None:
            self.env["MAILMETA_SINK_MAX_WAIT_MS"] = str(sink_wait_ms)
        self.lines: list[str] = []
        self.parts: dict[str, int] = {}
        self.child: Spawned | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.child.proc if self.child else None

    def start(self, timeout: float) -> None:
        argv = [sys.executable, "-m", "mailmeta", "up", "--data-dir", str(self.data_dir),
                "--smtp-port", str(self.smtp_port), "--api-port", str(self.api_port),
                "--broker-port", str(free_port()), "--broker", self.broker]  # fmt: skip
        # Own session, and if this script dies, `mailmeta up` stops too.
        child = self.child = Spawned(
            argv, ready_text="mailmeta is up", env=self.env, on_line=self.lines.append,
            own_session=True,
        )  # fmt: skip
        if not child.wait_ready(timeout):
            if not child.alive():
                raise BenchError(f"mailmeta up exited ({child.proc.returncode}):\n{self.tail()}")
            raise BenchError(f"mailmeta up not up within {timeout:.0f} s:\n{self.tail()}")
        for line in self.lines:  # "  sink     API http://… pid 1234  up"
            if " pid " in line:
                self.parts[line.split()[0]] = int(line.split(" pid ")[1].split()[0])

    def tail(self, n: int = 30) -> str:
        return "".join(self.lines[-n:])

    def token(self) -> str:
        return (self.data_dir / "operator-token").read_text().strip()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(40)


def sink_metrics(url: str) -> dict[str, float]:
    """The sink's counters and histogram sums/counts, summed over labels."""
    out: dict[str, float] = {}
    text = httpx.get(url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("mailmeta_sink_") and not sample.name.endswith("_created"):
                key = sample.name
                if sample.name.endswith("_bucket"):
                    key += f"le={sample.labels['le']}"
                out[key] = out.get(key, 0.0) + sample.value
    return out


def hist_quantile(d: dict[str, float], name: str, q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` of a histogram's delta ``d``."""
    buckets = sorted(
        (float(k.split("le=")[1]), v) for k, v in d.items() if k.startswith(name + "_bucketle=")
    )
    total = buckets[-1][1] if buckets else 0.0
    for le, n in buckets:
        if total and n >= q * total:
            return le
    return float("nan")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


# --- the SMTP load ---------------------------------------------------------------------------


class SmtpConn:
    """One persistent SMTP session; a message is MAIL, RCPT, DATA, body -> the final reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    @classmethod
    async def open(cls, port: int) -> SmtpConn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = cls(reader, writer)
        await conn.expect(220)
        await conn.cmd(b"EHLO bench.client\r\n", 250)
        return conn

    async def reply(self) -> tuple[int, bytes]:
        while True:
            line = await self.r.readline()
            if len(line) < 4:
                raise ConnectionError(f"connection closed or bad reply {line!r}")
            if line[3:4] != b"-":  # the last line of a multi-line reply
                return int(line[:3]), line

    async def expect(self, code: int) -> None:
        got, line = await self.reply()
        if got != code:
            raise BenchError(f"expected {code}, got {line!r}")

    async def cmd(self, data: bytes, code: int) -> None:
        self.w.write(data)
        await self.expect(code)

    async def send(self, body: bytes) -> tuple[int, bytes]:
        await self.cmd(b"MAIL FROM:<load@sender.example>\r\n", 250)
        await self.cmd(f"RCPT TO:<{RCPT}>\r\n".encode(), 250)
        await self.cmd(b"DATA\r\n", 354)
        self.w.write(body)
        return await self.reply()

    async def close(self) -> None:
        try:
            self.w.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 5)
        except (OSError, ConnectionError, TimeoutError):
            pass
        self.w.close()


def message(run: str, i: int, probe: bool, size: int) -> tuple[str, bytes]:
    mid = f"<{i}.{run}@bench.example>"
    subject = f"{'probe' if probe else 'load'}-{run} {i}"
    head = (
        f"From: load@sender.example\r\nTo: {RCPT}\r\nSubject: {subject}\r\n"
        f"Message-ID: {mid}\r\nDate: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}"
        "\r\n\r\n"
    )
    pad = max(0, size - len(head) - 5)
    full, rest = divmod(pad, 78)
    body = ("x" * 76 + "\r\n") * full + "x" * rest  # lines of 76, no bare CR or LF
    return mid, (head + body).encode() + b"\r\n.\r\n"


@dataclass
class LoadResult:
    sent: int = 0
    acked: int = 0
    refused: list[bytes] = field(default_factory=list)
    first_send: float = 0.0
    last_ack: float = 0.0
    smtp_s: list[float] = field(default_factory=list)  # MAIL sent -> 250
    late_s: list[float] = field(default_factory=list)  # scheduled -> 250 (backlog + SMTP)
    probes: dict[str, float] = field(default_factory=dict)  # Message-ID -> 250 (monotonic)


async def offer_load(
    port: int,
    run: str,
    *,
    rate: float,
    seconds: float,
    connections: int,
    sample: int,
    size: int,
    track: Connection,
    grace: float,
) -> LoadResult:
    """Send ``rate * seconds`` messages on a fixed schedule; the 250 time of every probe goes
    to ``track`` (the poller) as soon as it arrives."""
    total = int(rate * seconds)
    res = LoadResult()
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    conns = await asyncio.wait_for(
        asyncio.gather(*(SmtpConn.open(port) for _ in range(connections))), 30
    )

    async def schedule() -> None:
        t0 = time.monotonic()
        res.first_send = t0
        for i in range(total):
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0.002:
                await asyncio.sleep(delay)
            queue.put_nowait((i, due))
        for _ in conns:
            queue.put_nowait(None)

    async def worker(conn: SmtpConn) -> None:
        while (item := await queue.get()) is not None:
            i, due = item
            probe = i % sample == 0
            mid, body = message(run, i, probe, size)
            t = time.monotonic()
            res.sent += 1
            code, line = await conn.send(body)
            t250 = time.monotonic()
            if code != 250:
                res.refused.append(line)
                await conn.cmd(b"RSET\r\n", 250)
                continue
            res.acked += 1
            res.last_ack = t250
            res.smtp_s.append(t250 - t)
            res.late_s.append(t250 - due)
            if probe:
                res.probes[mid] = t250
                track.send(("track", mid, time.time() - (t250 - t)))
        await conn.close()

    try:
        await asyncio.wait_for(
            asyncio.gather(schedule(), *(worker(c) for c in conns)), seconds + grace
        )
    except TimeoutError:
        raise BenchError(
            f"the load did not finish within {seconds + grace:.0f} s "
            f"({res.acked} of {total} acknowledged)"
        ) from None
    except (OSError, ConnectionError) as exc:
        raise BenchError(f"SMTP failed after {res.acked} acknowledged: {exc!r}") from None
    return res


# --- the poller (its own process: its work must not delay the client's 250 timestamps) ------


def poller(conn: Connection, api: str, token: str, subject: str, interval: float) -> None:
    """Poll for probe rows until told to finish and every tracked probe was seen (or the
    finish deadline passes); send back {Message-ID: first seen (monotonic)} and stats."""
    sent_wall: dict[str, float] = {}
    seen: dict[str, float] = {}
    requests: list[float] = []
    finish_by: float | None = None
    with httpx.Client(
        base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as client:
        while True:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "track":
                    sent_wall[msg[1]] = msg[2]
                elif msg[0] == "finish":
                    finish_by = time.monotonic() + msg[1]
            unseen = [w for m, w in sent_wall.items() if m not in seen]
            if finish_by is not None and (not unseen or time.monotonic() > finish_by):
                break
            since = (min(unseen) if unseen else time.time()) - 2.0
            params: dict[str, Any] = {
                "customer": "demo",
                "subject": subject,
                "from": datetime.fromtimestamp(since, UTC).isoformat(),
                "limit": 1000,
            }
            t0 = time.monotonic()
            try:
                while True:
                    r = client.get("/v1/messages", params=params)
                    r.raise_for_status()
                    body = r.json()
                    now = time.monotonic()
                    for row in body["messages"]:
                        seen.setdefault(row["message_id"], now)
                    if not body["next"]:
                        break
                    params["cursor"] = body["next"]
            except (httpx.HTTPError, ValueError) as exc:
                conn.send(("error", f"API poll failed: {exc!r}"))
                return
            requests.append(time.monotonic() - t0)
            time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    conn.send(("done", seen, requests))


def count_stored(api: str, token: str, run: str, since_wall: float) -> tuple[int, int]:
    """(rows, distinct Message-IDs) of this run's mail, through the API's cursor pages."""
    rows, ids = 0, set()
    params: dict[str, Any] = {
        "customer": "demo",
        "subject": run,
        "from": datetime.fromtimestamp(since_wall, UTC).isoformat(),
        "limit": 1000,
    }
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {token}"}) as c:
        while True:
            r = c.get("/v1/messages", params=params, timeout=60)
            r.raise_for_status()
            body = r.json()
            rows += len(body["messages"])
            ids.update(m["message_id"] for m in body["messages"])
            if not body["next"]:
                return rows, len(ids)
            params["cursor"] = body["next"]


def pct(xs: list[float], q: float) -> float:
    return (
        statistics.quantiles(xs, n=1000, method="inclusive")[int(q * 10) - 1]
        if len(xs) > 1
        else xs[0]
    )


def ms(x: float) -> str:
    return f"{x * 1000:,.0f} ms"


@dataclass
class Phase:
    load: LoadResult
    latency: list[float]
    missing: int
    poll_s: list[float]


def phase(up: Up, args: argparse.Namespace, run: str, seconds: float) -> Phase:
    """One load at ``args.rate`` for ``seconds`` with its own poller; bounded throughout."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(
        target=poller, args=(theirs, up.api, up.token(), f"probe-{run}", args.poll), daemon=True
    )
    proc.start()
    try:
        load = asyncio.run(
            offer_load(up.smtp_port, run, rate=args.rate, seconds=seconds,
                       connections=args.connections, sample=args.sample, size=args.size,
                       track=ours, grace=args.timeout)
        )  # fmt: skip
        ours.send(("finish", args.timeout))
        if not ours.poll(args.timeout + 30):
            raise BenchError("the API poller did not report back in time")
        reply = ours.recv()
        if reply[0] == "error":
            raise BenchError(reply[1])
        _, seen, poll_s = reply
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    latency = [seen[m] - t for m, t in load.probes.items() if m in seen]
    return Phase(load, latency, len(load.probes) - len(latency), poll_s)


def bench_one(
    broker: str, args: argparse.Namespace, tmp: Path, sink_wait_ms: int | None = None
) -> dict[str, float]:
    name = broker if sink_wait_ms is None else f"{broker}, sink wait {sink_wait_ms} ms"
    up = Up(broker, tmp / f"{broker}-{sink_wait_ms}", sink_wait_ms)
    broker = name  # the label of every line below
    t0 = time.monotonic()
    try:
        up.start(args.start_timeout)
        print(f"[{broker}] mailmeta up --broker {broker}: up in {time.monotonic() - t0:.0f} s "
              f"(parts {', '.join(f'{k} {v}' for k, v in up.parts.items())})", flush=True)  # fmt: skip
        run = uuid.uuid4().hex[:10]
        start_wall = time.time()
        w: Phase | None = None
        if args.warmup > 0:
            w = phase(up, args, f"{run}w", args.warmup)
            if w.missing:
                raise BenchError(f"[{broker}] warm-up: {w.missing} probes never became visible")
            print(f"[{broker}] warm-up {args.warmup:.0f} s: {w.load.acked} acked, "
                  f"p50 {ms(statistics.median(w.latency))}", flush=True)  # fmt: skip
        assert up.proc is not None
        up.parts["supervisor"] = up.proc.pid
        cpu0 = {name: cpu_seconds(pid) for name, pid in up.parts.items()}
        sink0 = sink_metrics(up.metrics)
        t_load, client0 = time.monotonic(), time.process_time()
        p = phase(up, args, run, args.seconds)
        busy = time.monotonic() - t_load
        sink1 = sink_metrics(up.metrics)
        sd = {k: v - sink0.get(k, 0.0) for k, v in sink1.items()}
        client = 100 * (time.process_time() - client0) / busy
        cpu = {n: 100 * (cpu_seconds(pid) - cpu0[n]) / busy for n, pid in up.parts.items()}
        load = p.load
        achieved = load.acked / (load.last_ack - load.first_send)
        total_acked = load.acked + (w.load.acked if w else 0)
        print(f"[{broker}] offered {args.rate:,.0f} msg/s for {args.seconds:.0f} s on "
              f"{args.connections} connections: {load.acked:,} acknowledged, "
              f"{len(load.refused)} refused; achieved {achieved:,.0f} msg/s")  # fmt: skip
        if load.refused:
            print(f"[{broker}]   first refusal: {load.refused[0]!r}")
        print(f"[{broker}] SMTP transaction (MAIL -> 250): p50 {ms(pct(load.smtp_s, 50))}, "
              f"p99 {ms(pct(load.smtp_s, 99))}; behind schedule at 250: p50 "
              f"{ms(pct(load.late_s, 50))}, max {ms(max(load.late_s))}")  # fmt: skip
        if p.missing:
            raise BenchError(f"[{broker}] {p.missing} probes not visible within {args.timeout} s")
        lat = p.latency
        figures = {
            "p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99), "max": max(lat),
            "achieved": achieved,
        }  # fmt: skip
        print(f"[{broker}] 250 -> visible in the API ({len(lat)} probes, 1 in {args.sample}): "
              f"p50 {ms(figures['p50'])}, p95 {ms(figures['p95'])}, p99 {ms(figures['p99'])}, "
              f"max {ms(figures['max'])}  (target p99 < 1 s: "
              f"{'met' if figures['p99'] < 1 else 'NOT met'})")  # fmt: skip
        print(f"[{broker}]   poll every {args.poll * 1000:.0f} ms; API request p50 "
              f"{ms(statistics.median(p.poll_s))}")  # fmt: skip
        inserts = sd.get("mailmeta_sink_insert_seconds_count", 0.0)
        figures["inserts_per_s"] = inserts / busy
        print(f"[{broker}] sink: {inserts / busy:.1f} inserts/s, "
              f"{sd.get('mailmeta_sink_batch_rows_sum', 0) / max(1.0, inserts):,.0f} rows per "
              f"insert, insert mean {ms(sd.get('mailmeta_sink_insert_seconds_sum', 0) / max(1.0, inserts))}"
              f" (p99 <= {ms(hist_quantile(sd, 'mailmeta_sink_insert_seconds', 0.99))}); "
              f"redacted topic -> stored, oldest of each batch: mean "
              f"{ms(sd.get('mailmeta_sink_delay_seconds_sum', 0) / max(1.0, sd.get('mailmeta_sink_delay_seconds_count', 0)))}"
              f", p99 <= {ms(hist_quantile(sd, 'mailmeta_sink_delay_seconds', 0.99))}")  # fmt: skip
        figures["load1"] = os.getloadavg()[0]
        print(f"[{broker}] CPU during the load, % of one core: "
              + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
              + f"; the load client {client:.0f}; {loadavg()}")  # fmt: skip
        deadline = time.monotonic() + args.timeout
        while True:
            rows, ids = count_stored(up.api, up.token(), run[:10], start_wall - 5)
            if rows >= total_acked or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print(f"[{broker}] stored: {rows:,} rows, {ids:,} distinct Message-IDs "
              f"(acknowledged {total_acked:,})", flush=True)  # fmt: skip
        if rows != total_acked or ids != total_acked:
            raise BenchError(f"[{broker}] stored {rows} rows / {ids} ids, expected {total_acked}")
        return figures
    finally:
        up.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--broker", "--brokers", default="kafka,tansu", help="kafka, tansu or both")
    ap.add_argument("--rate", type=float, default=1000, help="offered msg/s")
    ap.add_argument("--seconds", type=float, default=30, help="measured load duration")
    ap.add_argument("--warmup", type=float, default=5, help="seconds of load first, not counted")
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--sample", type=int, default=20, help="every Nth message is a probe")
    ap.add_argument("--poll", type=float, default=0.05, help="API poll interval, s")
    ap.add_argument("--size", type=int, default=1024, help="message bytes")
    ap.add_argument("--timeout", type=float, default=60, help="bound on each wait after the load")
    ap.add_argument("--start-timeout", type=float, default=240)
    ap.add_argument(
        "--sink-wait-ms",
        default="",
        help="comma-separated MAILMETA_SINK_MAX_WAIT_MS values, each a run per broker",
    )
    args = ap.parse_args()
    header()
    try:
        waits: list[int | None] = [int(w) for w in args.sink_wait_ms.split(",") if w] or [None]
    except ValueError:
        ap.error("--sink-wait-ms: comma-separated whole milliseconds, e.g. 500,50")
    if any(w is not None and w < 1 for w in waits):
        ap.error("--sink-wait-ms: each at least 1")
    try:
        kinds = parse_kinds(args.broker, ("kafka", "tansu"))
    except ValueError as exc:
        ap.error(str(exc))
    if args.rate <= 0 or args.seconds <= 0 or args.sample < 1 or args.connections < 1:
        ap.error("--rate, --seconds, --sample and --connections must be positive")
    if args.connections > 50:
        ap.error("--connections: at most 50 (mailmeta's per-IP connection limit)")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mm-e2e-") as tmp:
        try:
            for kind in kinds:
                for wait in waits:
                    label = kind if wait is None else f"{kind} wait {wait} ms"
                    results[label] = bench_one(kind, args, Path(tmp), wait)
        except BenchError as exc:
            print(f"e2e_latency: {exc}", file=sys.stderr)
            return 1
    print(f"summary (250 -> visible; offered {args.rate:,.0f} msg/s):")
    for kind, f in results.items():
        print(f"  {kind:<20} achieved {f['achieved']:6,.0f} msg/s   p50 {ms(f['p50']):>8}   "
              f"p95 {ms(f['p95']):>8}   p99 {ms(f['p99']):>8}   max {ms(f['max']):>8}   "
              f"sink {f['inserts_per_s']:5.1f} inserts/s   load1 {f['load1']:.2f}")  # fmt: skip
    print(f"machine: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
