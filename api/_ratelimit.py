"""Token-bucket rate limits, in this process (per API replica: see ``_token_authority``)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """Token buckets by key (an API token's id, a client IP), in this process: ``burst``
    requests, refilled at ``rate``/s.

    Memory is bounded: a bucket untouched for ``burst / rate`` seconds is full again, the
    same as a new one, so it is dropped; and at most ``max_keys`` buckets are kept (the
    least recently used go first).
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst and max_keys >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._refill_s = self.burst / rate
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def _evict(self, now: float) -> None:
        # Least recently used first: stop at the first bucket still refilling.
        while self._buckets:
            key, oldest = next(iter(self._buckets.items()))
            if len(self._buckets) <= self.max_keys and now - oldest.stamp < self._refill_s:
                break
            del self._buckets[key]

    def _level(self, b: _Bucket, now: float) -> float:
        return min(self.burst, b.tokens + (now - b.stamp) * self.rate)

    def take(self, key: str) -> float:
        """0 when the request may go ahead (and charge it), else the seconds until it may."""
        now = time.monotonic()
        with self._lock:
            b = self._buckets.pop(key, None)
            if b is None:
                b = _Bucket(self.burst, now)
            b.tokens = self._level(b, now)
            b.stamp = now
            self._buckets[key] = b  # most recently used: last
            self._evict(now)
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / self.rate

    def retry_after(self, key: str) -> float:
        """Like ``take`` without charging: 0 when a request would be let through, else the
        seconds until one would."""
        now = time.monotonic()
        with self._lock:
            b = self._buckets.get(key)
            level = self.burst if b is None else self._level(b, now)
        return 0.0 if level >= 1.0 else (1.0 - level) / self.rate
