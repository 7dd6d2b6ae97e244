"""What the sink retries, and how: only failures of the store or of Kafka, with backoff.

A store that is down (``StoreError``) or a broker that does not acknowledge dead letters
(``KafkaException``; ``BufferError``: librdkafka's local queue is full) comes back: the batch
is retried until it is stored, never skipped. Anything else (a ``TypeError`` from a bad row,
an ``UnstorableEvent`` the store's check let through) is a programming error that retrying
cannot fix: it is raised at once, so the consumer fails loudly (logged with its traceback,
``mailmeta_sink_failures_total``, /healthz "failed", and ``mailmeta sink`` exits for its
supervisor to restart it) instead of a partition sitting in "retrying" forever. Nothing is
committed past the batch, so no record is lost or dead-lettered for the program's fault.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import KafkaException

from mailmeta.store import StoreError

log = logging.getLogger("mailmeta.sinks.consumer")

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
# The failures that pass: everything else is a bug to surface, not to wait out.
RETRYABLE: tuple[type[BaseException], ...] = (StoreError, KafkaException, BufferError)

_T = TypeVar("_T")


class Aborted(Exception):
    """stop() ran out of time while a batch was still being retried."""


def retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure that passes (store or Kafka), worth retrying."""
    return isinstance(exc, RETRYABLE)


def backoff(attempt: int) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1, 2, …): doubling, capped."""
    return min(BACKOFF_FIRST * 2 ** (attempt - 1), BACKOFF_MAX)


def retry(
    what: str,
    fn: Callable[[], _T],
    abort: threading.Event,
    on_failure: Callable[[str, BaseException], None],
) -> _T:
    """``fn()``, retried with backoff while it raises a retryable error; any other error is
    raised at once. ``on_failure(what, exc)`` is told of each retried failure; Aborted when
    ``abort`` is set while waiting."""
    attempt = 0
    while True:
        try:
            return fn()
        except RETRYABLE as exc:
            attempt += 1
            delay = backoff(attempt)
            on_failure(what, exc)
            log.warning("%s failed (attempt %d), retrying in %.1fs: %s", what, attempt, delay, exc)
            if abort.wait(delay):
                raise Aborted from exc
