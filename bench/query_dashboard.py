"""Dashboard queries on a large table: messages page and hourly stats, p50/p95.

.venv/bin/python bench/query_dashboard.py [--rows 10000000] [--runs 200]

Rows are generated inside ClickHouse (INSERT … SELECT FROM numbers()) into a fresh embedded
store, spread over 20 customers and the last 50 days, so the hourly aggregates fill through
the materialized view as in production. Queries go through the store, as the API calls them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from _report import header

from mailmeta.store import ClickHouseStore

CUSTOMERS = 20
DAYS = 50


def fill(store: ClickHouseStore, rows: int) -> None:
    chunk = 1_000_000
    for start in range(0, rows, chunk):
        store._command(
            "INSERT INTO messages (event_id, received_at, customer_id, status, sender_ip, "
            "mail_from, rcpt_to, message_id, subject, size_bytes, smtp_reply, policy_version, "
            "retention_days) SELECT generateUUIDv7(number), "
            "now64(3) - toIntervalMillisecond(rand64(1) % {span:UInt64}), "
            "concat('c', toString(number % {n:UInt32})), "
            "['delivered','delivered','delivered','deferred','bounced'][1 + intDiv(number, {n:UInt32}) % 5], "
            "'198.51.100.0/24', concat('k1:', hex(sipHash64(number))), ['j***@x.example'], "
            "concat('<', toString(number), '@mx.example>'), concat('Invoice ', toString(number)), "
            "1000 + number % 5000, '250 2.0.0 Ok', 1, 60 "
            "FROM numbers({start:UInt64}, {count:UInt64})",
            {
                "span": DAYS * 86_400_000,
                "n": CUSTOMERS,
                "start": start,
                "count": min(chunk, rows - start),
            },
        )


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(samples, n=20)
    return statistics.median(samples), q[18]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    header()
    retention = {f"c{i}": 60 for i in range(CUSTOMERS)}
    with tempfile.TemporaryDirectory() as tmp, ClickHouseStore(f"chdb://{tmp}", retention) as s:
        t0 = time.perf_counter()
        fill(s, args.rows)
        print(f"filled {s.count():,} rows in {time.perf_counter() - t0:.1f} s")
        rnd = random.Random(1)

        def customer() -> str:
            return f"c{rnd.randrange(CUSTOMERS)}"

        now = datetime.now(UTC)
        cases: dict[str, Callable[[], object]] = {
            "messages page (newest 50)": lambda: s.query_messages(customer(), limit=50),
            "hourly stats, 7 days": lambda: s.hourly_stats(
                customer(), now - timedelta(days=7), now
            ),
            "hourly stats, 30 days": lambda: s.hourly_stats(
                customer(), now - timedelta(days=30), now
            ),
        }
        if hasattr(s, "search_events"):  # the dashboard's page query, when present
            from mailmeta.store import SearchFilter

            cases["dashboard search page (50)"] = lambda: s.search_events(
                customer(), SearchFilter(), 50
            )
            bounced = SearchFilter(statuses=("bounced",))
            cases["search, status=bounced (50)"] = lambda: s.search_events(customer(), bounced, 50)

            def tenth_page() -> object:
                c, after = customer(), None
                for _ in range(10):
                    _, after = s.search_events(c, SearchFilter(), 50, after)
                return after

            cases["10 pages via cursor (total)"] = tenth_page
            # The worst case: a filter nothing matches reads every row of the customer.
            nobody = SearchFilter(senders=("k1:nobody",))
            cases["search, no match (worst)"] = lambda: s.search_events(customer(), nobody, 50)
        print(f"{'query':<30} {'p50 ms':>8} {'p95 ms':>8}   ({args.runs} runs each)")
        for name, fn in cases.items():
            p50, p95 = timed(fn, args.runs)
            print(f"{name:<30} {p50:>8.1f} {p95:>8.1f}")


if __name__ == "__main__":
    main()
