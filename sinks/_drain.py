"""Drain markers: when has the sink stored everything produced before a shutdown request?

The redaction worker forwards a marker {nonce, from=p} from each raw partition p to every
redacted partition q, after everything it produced from p. So for a nonce the sink has
drained once it has seen (q, p) for every q and p, and committed what came before each.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

# Nonces are per shutdown; a handful is plenty, and the bound keeps a flood harmless.
_MAX_NONCES = 256


class DrainState:
    """Thread-safe: the consumer records committed markers, the API asks."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self._expected = partitions * partitions
        self._seen: OrderedDict[str, set[tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, markers: Iterable[tuple[str, int, int]]) -> None:
        """Markers (nonce, redacted partition q, source partition p), all committed."""
        with self._lock:
            for nonce, q, p in markers:
                if not (0 <= q < self.partitions and 0 <= p < self.partitions):
                    continue
                seen = self._seen.get(nonce)
                if seen is None:
                    seen = self._seen[nonce] = set()
                    while len(self._seen) > _MAX_NONCES:
                        self._seen.popitem(last=False)
                seen.add((q, p))

    def seen(self, nonce: str) -> int:
        with self._lock:
            return len(self._seen.get(nonce, ()))

    def drained(self, nonce: str) -> bool:
        return self.seen(nonce) >= self._expected

    def status(self, nonce: str) -> dict[str, object]:
        seen = self.seen(nonce)
        return {
            "nonce": nonce,
            "drained": seen >= self._expected,
            "markers_seen": seen,
            "markers_expected": self._expected,
        }
