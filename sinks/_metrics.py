"""Prometheus metrics of the sink (served when MAILMETA_SINK_METRICS_PORT is set).

The counters and histograms move as the consumer works. Lag and the age of the oldest
unstored event come from ``LagMonitor``: the group's committed offsets against the topic's
end offsets, read by a client of its own that never joins the group, so they are reported
while the consumer is stuck (ClickHouse away), between rebalances, or stopped.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from confluent_kafka import Consumer, KafkaException
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from mailmeta.config import Settings
from mailmeta.kafka import consumer_config, group_backlog

log = logging.getLogger("mailmeta.sinks")

EVENTS_STORED = Counter("mailmeta_sink_events", "Events inserted into the store")
DEAD_LETTERS = Counter(
    "mailmeta_sink_dead_letters",
    "Records sent to the dead-letter topic, by reason (schema: empty, not JSON or not a "
    "valid event; region: a customer of another region; unstorable: the store refuses it, "
    "e.g. an unknown customer)",
    ["reason"],
)
INSERT_SECONDS = Histogram(
    "mailmeta_sink_insert_seconds",
    "Time to insert one batch into the store, retries included",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BATCH_ROWS = Histogram(
    "mailmeta_sink_batch_rows",
    "Records per batch handed to the store",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000),
)
FLUSHES = Counter(
    "mailmeta_sink_flushes",
    "Batches handed to the writer, by what ended them (full: MAX_ROWS; waited: "
    "MAILMETA_SINK_MAX_WAIT_MS passed; rebalance; shutdown)",
    ["trigger"],
)
DELAY_SECONDS = Histogram(
    "mailmeta_sink_delay_seconds",
    "From the oldest record of a batch being written to the redacted topic (its Kafka "
    "timestamp) until the batch is stored: the sink's share of end-to-end latency",
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0),
)
STORE_ERRORS = Counter(
    "mailmeta_sink_store_errors", "Failed attempts to insert a batch (each is retried)"
)
FAILURES = Counter(
    "mailmeta_sink_failures",
    "Times the consumer stopped on an error that is not retried (a bug, not the store or "
    "Kafka failing: see the log's traceback), by exception type",
    ["error"],
)
LAG = Gauge(
    "mailmeta_sink_consumer_lag",
    "Records of the redacted topic not yet stored and committed by the sink's group, per "
    "partition (end offset - committed offset)",
    ["partition"],
)
OLDEST_UNSTORED_AGE = Gauge(
    "mailmeta_sink_oldest_unstored_age_seconds",
    "Age of the oldest record of the redacted topic the sink's group has not stored (its "
    "Kafka timestamp); 0 when none waits",
)
CHECK_EVERY_S = 5.0
_READ_TIMEOUT_S = 3.0


def serve(port: int, host: str) -> tuple[Any, threading.Thread]:
    """Expose /metrics on ``host:port``; returns the server (``shutdown()`` stops it)."""
    return start_http_server(port, addr=host)


class LagMonitor:
    """Measures the group's lag and the age of its oldest unstored record every
    ``interval`` s in a thread; ``check()`` does one measurement."""

    def __init__(self, settings: Settings, group_id: str, interval: float = CHECK_EVERY_S):
        self.topic = settings.redacted_topic
        self.interval = interval
        # Small fetches: only one record per lagging partition is read, for its timestamp.
        self._consumer = Consumer(
            consumer_config(
                settings,
                group_id,
                logger=logging.getLogger("mailmeta.sinks.kafka"),
                **{"fetch.message.max.bytes": 65536, "queued.max.messages.kbytes": 1024},
            )
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error = ""

    def start(self) -> LagMonitor:
        self._thread = threading.Thread(target=self._run, name="mailmeta-sink-lag", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still in a bounded broker call: it closes the client itself
        self._consumer.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
                self._last_error = ""
            except (KafkaException, RuntimeError, TimeoutError) as exc:  # a hiccup: try again
                text = str(exc)
                if text != self._last_error:
                    log.warning("could not measure the sink's lag: %s", text)
                    self._last_error = text
            self._stop.wait(self.interval)

    def check(self) -> tuple[dict[int, int], float]:
        """(lag per partition, age of the oldest unstored record in s); sets the gauges."""
        backlog = group_backlog(self._consumer, self.topic, _READ_TIMEOUT_S)
        for p, n in backlog.lag.items():
            LAG.labels(partition=str(p)).set(n)
        OLDEST_UNSTORED_AGE.set(backlog.oldest_age_s)
        return backlog.lag, backlog.oldest_age_s
