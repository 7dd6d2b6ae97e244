"""Query API latency on N stored rows (default 10M) at C concurrent clients.

    .venv/bin/python bench/api_latency.py [--rows 10000000] [--clients 20] [--seconds 20]

Rows go in by direct ``insert_arrow`` (not through Kafka). The API (with tokens on) runs in
this process, which owns the chdb directory; the clients run in a separate process (20
threads, keep-alive connections) so they do not share the server's GIL. Prints p50/p95 per
route and the request rate the one API process sustained.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from _report import header

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.api_helpers

ROUTES = {
    "messages page": "/v1/messages?limit=50",
    "messages filtered": "/v1/messages?limit=50&status=bounced&sender=alice@sender.example",
    "stats 7d": "/v1/stats?customer=acme",
}


def generate(store: object, rows: int, chunk: int = 1_000_000) -> float:
    from mailmeta.policy import hmac_tagged
    from mailmeta.store import ARROW_SCHEMA
    from tests.api_helpers import CUSTOMERS

    # The forms acme's policy stores (hmac under its active key), as the redactor makes them.
    acme = CUSTOMERS.by_id["acme"]
    key_id, key = acme.active_key_id or "k1", acme.key_bytes()

    def acme_hmac(value: str) -> str:
        return hmac_tagged(key_id, key, value)

    rng = np.random.default_rng(1)
    now_ms = int(time.time() * 1000)
    senders = np.array(
        [acme_hmac(f"user{i}@sender.example") for i in range(999)]
        + [acme_hmac("alice@sender.example")]
    )
    statuses = np.array(["delivered", "delivered", "delivered", "deferred", "bounced", "accepted"])
    start = time.perf_counter()
    done = 0
    while done < rows:
        n = min(chunk, rows - done)
        cols = {
            "event_id": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(16), n, [None, pa.py_buffer(rng.bytes(16 * n))]
            ),
            "received_at": pa.array(
                now_ms - rng.integers(0, 30 * 86_400_000, n), pa.timestamp("ms", tz="UTC")
            ),
            "customer_id": pa.array(np.where(rng.random(n) < 0.9, "acme", "globex")),
            "status": pa.array(statuses[rng.integers(0, len(statuses), n)]),
            "sender_ip": pa.array(["198.51.100.0/24"] * n),
            "helo": pa.nulls(n, pa.string()),
            "mail_from": pa.array(senders[rng.integers(0, len(senders), n)]),
            "rcpt_to": pa.array([[acme_hmac("bob@acme.example")]] * n, pa.list_(pa.string())),
            "message_id": pa.array([f"<{i}@mx.example>" for i in range(done, done + n)]),
            "subject": pa.array(["Quarterly report"] * n),
            "date_text": pa.nulls(n, pa.string()),
            "size_bytes": pa.array(rng.integers(500, 50_000, n), pa.uint64()),
            "smtp_reply": pa.array(["250 2.0.0 Ok"] * n),
            "processing_ms": pa.array(rng.random(n) * 10),
            "tls_version": pa.array(["TLSv1.3"] * n),
            "policy_version": pa.array(np.full(n, 3), pa.uint32()),
            "retention_days": pa.array(np.full(n, 60), pa.uint16()),
        }
        table = pa.Table.from_arrays(
            [cols[f.name].cast(f.type) for f in ARROW_SCHEMA], schema=ARROW_SCHEMA
        )
        # The store's own insert path: the rows and, once per event, the hourly counts.
        with store._write_lock:  # type: ignore[attr-defined]
            store._insert_rows(table)  # type: ignore[attr-defined]
        done += n
        print(f"  inserted {done:,} rows", file=sys.stderr, flush=True)
    return rows / (time.perf_counter() - start)


def client_main(url: str, token: str, clients: int, seconds: float, route: str) -> None:
    import httpx

    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        nonlocal errors
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as c:
            mine = []
            bad = 0
            while time.monotonic() < stop_at:
                t = time.perf_counter()
                r = c.get(route)
                mine.append(time.perf_counter() - t)
                bad += r.status_code != 200
            with lock:
                lat.extend(mine)
                errors += bad

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    print(json.dumps({
        "requests": len(lat), "errors": errors, "rps": len(lat) / wall,
        "p50_ms": 1000 * lat[len(lat) // 2], "p95_ms": 1000 * lat[int(len(lat) * 0.95)],
        "mean_ms": 1000 * statistics.fmean(lat),
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(
            args.client[0],
            os.environ["BENCH_TOKEN"],
            args.clients,
            args.seconds,
            args.client[1] + args.client[2],
        )
        return

    header()
    from tests.api_helpers import ApiServer

    with tempfile.TemporaryDirectory(prefix="mailmeta-bench-") as tmp:
        server = ApiServer(Path(tmp), rate_per_s=1e9, burst=10**9)
        try:
            rate = generate(server.store, args.rows)
            print(f"generated {args.rows:,} rows at {rate:,.0f} rows/s (through the store)")
            server.store._command(
                "OPTIMIZE TABLE messages FINAL"
            )  # a settled table, as after merges
            server.start()
            token = server.token("acme", "messages:read", "stats:read")
            for name, route in ROUTES.items():
                path, _, query = route.partition("?")
                out = subprocess.run(
                    [sys.executable, __file__, "--clients", str(args.clients), "--seconds", str(args.seconds),
                     "--client", server.url, path, "?" + query],
                    env={**os.environ, "BENCH_TOKEN": token}, capture_output=True, text=True, timeout=args.seconds + 120,
                )  # fmt: skip
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    raise SystemExit(f"client failed for {name}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"{name:<18} {args.clients} clients: p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms"
                    f"  {r['rps']:7.1f} req/s  ({r['requests']} requests, {r['errors']} errors)",
                    flush=True,
                )
        finally:
            if server.server.started:
                server.stop()
            else:
                server.auth.close()
                server.store.close()


if __name__ == "__main__":
    main()
