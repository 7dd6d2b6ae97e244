"""A redaction worker's report of what it applies (policy/_applied.py has the record).

Per customer of its region: the version and digest in force in its redactor, and the newest
version it was given but refused (a key it cannot resolve, a different document under a
number it already holds), with the reason. Sent to the policy-status topic whenever that
changes and every ``policy_status_every_s`` as a heartbeat; a tombstone on a clean stop, so
the API stops counting the worker at once (a crashed one drops out after the staleness
window).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from typing import Any

from confluent_kafka import Producer
from prometheus_client import Gauge

from mailmeta.config import Customers, Settings
from mailmeta.kafka import producer_config
from mailmeta.policy import (
    MAX_REASON,
    STATUS_PARTITION,
    CustomerStatus,
    PolicyRecordError,
    RedactionError,
    Redactor,
    Refusal,
    WorkerStatus,
    decode_record,
)

log = logging.getLogger("mailmeta.streams")

POLICY_REFUSED = Gauge(
    "mailmeta_redaction_policy_refused",
    "The policy version a worker was given but does not apply (0: none refused), per customer; "
    "while it refuses, that customer's events are dead-lettered",
    ["customer"],
)
# How often the worker looks whether its policy table moved (cheap: one integer compared).
WATCH_EVERY_S = 0.2


def worker_id() -> str:
    """host:pid: unique among live workers, and a restarted worker is a new one."""
    host = "".join(ch if ch.isalnum() or ch in "-._" else "-" for ch in socket.gethostname())
    return f"{host[:150] or 'host'}:{os.getpid()}"


class PolicyStatusReporter:
    """Builds and sends this worker's status record. ``table`` is the worker's policy table:
    its raw records say which version (and document) the worker was given."""

    def __init__(
        self, settings: Settings, customers: Customers, redactor: Redactor, table: Any
    ) -> None:
        self.settings = settings
        self.customers = customers
        self.redactor = redactor
        self.table = table
        self.worker = worker_id()
        self._producer: Producer | None = None
        self._digests: dict[int, str] = {}  # id(Policy) -> digest, for the policies held now
        # customer -> (its raw record in the table, (version, digest)): decoded once per change.
        self._given_cache: dict[str, tuple[bytes, tuple[int, str] | None]] = {}
        self._last: dict[str, CustomerStatus] | None = None
        # Sends are serialised, and none follows the tombstone: the reporting task may still
        # be running while the worker shuts down.
        self._send_lock = threading.Lock()
        self._stopped = False

    def _digest(self, policy: Any) -> str:
        key = id(policy)
        d = self._digests.get(key)
        if d is None:
            d = self._digests[key] = policy.digest()
        return d

    def _given(self, customer_id: str) -> tuple[int, str] | None:
        """(version, digest) of the customer's record in the policy table, if readable."""
        raw = self.table.data.get(customer_id.encode())
        if not raw:
            return None
        cached = self._given_cache.get(customer_id)
        if cached is not None and cached[0] == raw:
            return cached[1]
        try:
            rec = decode_record(customer_id.encode(), raw)
        except PolicyRecordError:
            rec = None
        given = (rec.version, rec.policy.digest()) if rec is not None else None
        self._given_cache[customer_id] = (raw, given)
        return given

    def snapshot(self) -> dict[str, CustomerStatus]:
        out: dict[str, CustomerStatus] = {}
        held: set[int] = set()
        for c in self.customers.here():
            given = self._given(c.id)
            refused: Refusal | None = None
            try:
                compiled = self.redactor.compiled(c.id)
            except RedactionError as exc:
                version, digest = None, None
                v = self.redactor.version_of(c.id)
                if v is not None:
                    d = given[1] if given is not None and given[0] == v else None
                    refused = Refusal(version=v, digest=d, reason=str(exc)[:MAX_REASON])
            else:
                version = compiled.version
                digest = self._digest(compiled.policy) if compiled.policy is not None else None
                held.add(id(compiled.policy))
                if given is not None and given[0] == version and given[1] != digest:
                    refused = Refusal(
                        version=given[0],
                        digest=given[1],
                        reason=f"v{version} is already in force here as a different document",
                    )
            out[c.id] = CustomerStatus(version=version, digest=digest, refused=refused)
            POLICY_REFUSED.labels(c.id).set(refused.version if refused else 0)
        # Forget digests of policies no longer held (ids may be reused).
        self._digests = {k: v for k, v in self._digests.items() if k in held}
        return out

    def record(self, customers: dict[str, CustomerStatus]) -> WorkerStatus:
        return WorkerStatus(
            worker=self.worker,
            region=self.settings.region,
            at=int(time.time() * 1000),
            every_s=self.settings.policy_status_every_s,
            customers=customers,
        )

    def _send(self, value: bytes | None) -> None:
        if self._producer is None:
            self._producer = Producer(producer_config(self.settings))
        self._producer.produce(
            self.settings.policy_status_topic,
            value,
            key=self.worker.encode(),
            partition=STATUS_PARTITION,
        )
        if self._producer.flush(10) != 0:
            raise TimeoutError("the broker did not acknowledge the policy status in time")

    async def run(self, ready: asyncio.Event) -> None:
        """Report once the policy table is loaded, then on each change and each heartbeat."""
        await ready.wait()
        loop = asyncio.get_running_loop()
        every = self.settings.policy_status_every_s
        next_beat = 0.0
        seen = None
        while True:
            offset = getattr(self.table, "applied_offset", None)
            beat = loop.time() >= next_beat
            if beat or offset != seen:
                seen = offset
                try:
                    # snapshot() reads the redactor on the loop; only the send is off it.
                    snap = self.snapshot()
                    if beat or snap != self._last:
                        await loop.run_in_executor(None, self._publish, snap)
                        next_beat = loop.time() + every
                except Exception as exc:  # a broker hiccup: try again at the next beat
                    log.warning("could not report the policy status: %s", exc)
                    next_beat = loop.time() + every
            await asyncio.sleep(WATCH_EVERY_S)

    def _publish(self, snap: dict[str, CustomerStatus]) -> None:
        changed = snap != self._last
        with self._send_lock:
            if self._stopped:
                return
            self._send(self.record(snap).encode())
        if changed:
            log.info(
                "policy status: %s",
                ", ".join(f"{c} v{s.version}" + (f" (refused v{s.refused.version})"
                          if s.refused else "") for c, s in sorted(snap.items())),
            )  # fmt: skip
        self._last = snap

    def stop(self) -> None:
        """A tombstone: this worker applies nothing any more (a clean stop)."""
        try:
            with self._send_lock:
                self._stopped = True
                self._send(None)
        except Exception as exc:
            log.warning("could not withdraw the policy status: %s", exc)
        finally:
            producer, self._producer = self._producer, None
            if producer is not None:
                producer.flush(5)
                producer.close()
