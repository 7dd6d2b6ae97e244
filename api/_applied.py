"""The ``applied`` section of the policy routes: what the live redaction workers apply of each
customer's published version (policy/_applied.py), not only what is published.

A worker is live when its latest status record is at most ``policy_status_stale_s`` old (a
worker that stopped cleanly withdrew its record at once). One read of the status topic serves
requests for ``TTL_S``, so the dashboard and ``mailmeta policy set --wait`` polling it cost
one consumer a second at most.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from mailmeta.config import Settings
from mailmeta.policy import PolicyRecord, WorkerStatus, applied_view, read_statuses

log = logging.getLogger("mailmeta.api.policies")

TTL_S = 1.0


class AppliedStatus:
    def __init__(self, settings: Settings, ttl: float = TTL_S) -> None:
        self.settings = settings
        self.ttl = ttl
        self._lock = threading.Lock()
        self._until = 0.0
        self._workers: dict[str, WorkerStatus] = {}

    def workers(self) -> dict[str, WorkerStatus]:
        with self._lock:
            now = time.monotonic()
            if now >= self._until:
                read = read_statuses(self.settings, self.settings.policy_status_stale_s)
                if read["invalid"]:
                    log.error(
                        "%s unreadable record(s) on the policy-status topic %s",
                        read["invalid"], self.settings.policy_status_topic,
                    )  # fmt: skip
                self._workers, self._until = read["workers"], now + self.ttl
            return self._workers

    def of(self, records: Mapping[str, PolicyRecord]) -> dict[str, dict[str, Any]]:
        """Per customer: its published version and digest, and who applies it."""
        stale = self.settings.policy_status_stale_s
        try:
            workers = list(self.workers().values())
        except Exception as exc:
            # What is published stays readable (and changeable) without the reports.
            log.error("reading the policy-status topic failed: %s", exc)
            return {
                cid: {
                    "version": rec.version,
                    "digest": rec.policy.digest(),
                    "applied_by": None,
                    "workers": None,
                    "stale_after_s": stale,
                    "by_worker": [],
                    "not_applied": {},
                    "error": "the policy-status topic cannot be read: what workers apply is unknown",
                }
                for cid, rec in records.items()
            }
        return {
            cid: applied_view(cid, rec.version, rec.policy.digest(), workers, stale)
            for cid, rec in records.items()
        }


def get_applied(request: Request) -> AppliedStatus:
    applied: AppliedStatus | None = getattr(request.app.state, "applied", None)
    if applied is None:
        raise HTTPException(503, "policies are not available in this process")
    return applied


AppliedDep = Annotated[AppliedStatus, Depends(get_applied)]
