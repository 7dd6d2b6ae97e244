"""The redaction policy in force per customer, as every route sees it: the policy routes,
``/v1/me``, searches and the dashboard's field tags. Not the customers file's: an operator
may have published a newer version (``PUT /v1/policies/{customer}``).

The policies topic is what the redaction workers apply, so it is the authority. A read costs
a consumer (measured ~35 ms on Apache Kafka, ~7 ms on Tansu), too much for every request:
a read is kept for ``TTL_S``. A change published through this process replaces its customer's
entry at once; one published through another replica is seen within ``TTL_S``. The policy
routes read the topic afresh (``strict``) and answer 503 when they cannot.

Searches also need every version rows may be stored under (the store's policy history, ~5 ms
a read), kept as long. Both caches hold one entry per customer of the file: bounded.

Without a policies topic (an app built without ``install_policies``) the file is in force.
When the topic cannot be read, reads fall back to the store's newest recorded version (or the
file's) and try the topic again after ``RETRY_S``, so a broker outage never slows every
request by the read's timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated, Any, cast

from fastapi import Depends, HTTPException, Request

from mailmeta.api._policy_ops import newest_stored, stored_policies
from mailmeta.config import POLICY_FIELDS, Customers, Policy
from mailmeta.policy import PolicyLog, PolicyRecord, effective
from mailmeta.store import Store

log = logging.getLogger("mailmeta.api.policies")

TTL_S = 2.0
RETRY_S = 30.0


def redaction_info(policy: Policy, version: int) -> dict[str, Any]:
    """A policy version as the API shows it: each field's action (fields not named are
    dropped)."""
    return {
        "policy_version": version,
        "actions": {f: policy.action_for(f).value for f in POLICY_FIELDS},
    }


class PoliciesInForce:
    def __init__(self, store: Store, policy_log: PolicyLog | None, ttl: float = TTL_S) -> None:
        self.store = store
        self.policy_log = policy_log
        self.ttl = ttl
        self._lock = threading.Lock()
        self._topic: dict[str, PolicyRecord] = {}
        # What the last read of the topic refused or found in conflict, per customer.
        self._problems: dict[str, list[dict[str, Any]]] = {}
        self._topic_until = 0.0  # monotonic time until which ``_topic`` is used as is
        self._history: dict[str, tuple[float, dict[int, Policy]]] = {}

    def records(self, customers: Customers, strict: bool = False) -> dict[str, PolicyRecord]:
        """The record in force of each of ``customers``. ``strict``: the topic read now, or
        503 (what the policy routes act on)."""
        return effective(customers, self._topic_records(customers, strict))

    def _topic_records(self, customers: Customers, strict: bool) -> dict[str, PolicyRecord]:
        if self.policy_log is None:
            return {}
        with self._lock:
            now = time.monotonic()
            if not strict and now < self._topic_until:
                return self._topic
            try:
                state = self.policy_log.read()
                self._topic, self._topic_until = state.records, now + self.ttl
                self._problems = state.problems
            except Exception as exc:
                log.error("reading the policies topic failed: %s", exc)
                if strict:
                    raise HTTPException(503, "policies topic unavailable") from None
                # The durable record of every published version; the file's when none.
                self._topic = newest_stored(self.store, customers.regional())
                self._topic_until = now + RETRY_S
            return self._topic

    def problems(self, customer: str) -> list[dict[str, Any]]:
        """The customer's records the last read refused (undecodable, or a version published
        again with another document): errors an operator must see, never deletions."""
        with self._lock:
            return list(self._problems.get(customer, ()))

    def published(self, rec: PolicyRecord) -> None:
        """A version this process published is in force from now on."""
        with self._lock:
            self._topic = {**self._topic, rec.customer_id: rec}
            self._history.pop(rec.customer_id, None)

    def versions(self, customers: Customers, customer: str) -> dict[int, Policy]:
        """Every version of ``customer``'s policy rows may be stored under, by number (the
        history, the file's and the one in force)."""
        current = self.records(customers)[customer]
        with self._lock:
            until, known = self._history.get(customer, (0.0, {}))
        if time.monotonic() >= until or current.version not in known:
            known = stored_policies(self.store, customers, customer, current)
            with self._lock:
                self._history[customer] = (time.monotonic() + self.ttl, known)
        return known


def get_in_force(request: Request) -> PoliciesInForce:
    return cast(PoliciesInForce, request.app.state.policies)


InForceDep = Annotated[PoliciesInForce, Depends(get_in_force)]
