"""The access log: request metadata written to the store in batches, from a thread."""

from __future__ import annotations

import logging
import threading

from mailmeta.store import AccessRecord, TokenStore

log = logging.getLogger("mailmeta.api.auth")


class AccessLog:
    """Request metadata (time, route, status, latency, token id) written in batches.

    One ClickHouse insert per request would make a part per request; a background thread
    flushes what accumulated every ``interval`` seconds instead.
    """

    def __init__(self, store: TokenStore, interval: float = 1.0, max_pending: int = 100_000):
        self._store = store
        self._interval = interval
        self._max = max_pending
        self._pending: list[AccessRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mailmeta-access-log", daemon=True)
        self._thread.start()

    def add(self, record: AccessRecord) -> None:
        with self._lock:
            if len(self._pending) < self._max:  # bounded: drop rather than grow without end
                self._pending.append(record)

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            try:
                self._store.append_access(batch)
            except Exception as exc:  # a lost access-log batch must not stop the API
                log.warning("could not write %s access-log records: %s", len(batch), exc)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def close(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.flush()
