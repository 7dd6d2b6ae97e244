"""What each redaction worker applies: records of the policy-status topic, reading them, and
the "published vN, applied by k of n workers" view the API serves.

One record per worker, keyed by its id, sent whenever what it applies changes and as a
heartbeat every ``policy_status_every_s`` (streams/_status.py); a tombstone when it stops:

    {"worker": "host:pid", "region": "default", "at": <epoch ms>, "every_s": 5.0,
     "customers": {"idn": {"version": 3, "digest": "<sha256 hex>",
                           "refused": {"version": 4, "digest": "<hex>", "reason": "…"}}}}

``version``/``digest`` null: the worker applies no policy of that customer (it refused the
newest, and fails closed: such events are dead-lettered). A digest names a document
(``Policy.digest``); no document, key or event value is ever in a status record.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from mailmeta.config import Settings
from mailmeta.kafka import read_partition
from mailmeta.schema import format_time

STATUS_PARTITION = 0
MAX_REASON = 300

_Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
_Version = Annotated[int, Field(ge=1)]
WorkerId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:@-]{1,200}$")]
_CustomerId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class StatusRecordError(ValueError):
    """A record on the policy-status topic that is not a valid status record."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Refusal(_Strict):
    """The newest version a worker was given but does not apply, and why (no contents)."""

    version: _Version
    digest: _Digest | None = None
    reason: Annotated[str, StringConstraints(max_length=MAX_REASON)]


class CustomerStatus(_Strict):
    version: _Version | None
    digest: _Digest | None
    refused: Refusal | None = None


class WorkerStatus(_Strict):
    worker: WorkerId
    region: Annotated[str, StringConstraints(max_length=16)]
    at: Annotated[int, Field(ge=0)]  # epoch ms, the worker's clock
    every_s: Annotated[float, Field(gt=0)]
    customers: dict[_CustomerId, CustomerStatus]

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()


def decode_status(key: bytes | None, value: bytes | None) -> WorkerStatus | None:
    """The record, or None for a tombstone; StatusRecordError when malformed."""
    if value is None:
        return None
    try:
        status = WorkerStatus.model_validate_json(value)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e.get("loc", ())) or "record"
        raise StatusRecordError(f"{where}: {e['msg']}") from None
    if key is not None and key != status.worker.encode():
        raise StatusRecordError("worker is not the record's key")
    return status


def read_statuses(settings: Settings, within_s: float, timeout: float = 10.0) -> dict[str, Any]:
    """Each worker's latest status heard within ``within_s`` seconds, by worker id, and the
    ids of records that could not be read (``{"workers": {...}, "invalid": n}``).

    Reads only the topic's tail from ``within_s`` ago (ListOffsets by time): an older record
    cannot make a worker live, so what the topic holds of workers long gone is never read.
    """
    since_ms = int((time.time() - within_s) * 1000)
    latest: dict[str, WorkerStatus | None] = {}
    invalid = 0
    # Margin for the clocks of workers and broker: a little more than the window.
    for msg in read_partition(
        settings,
        settings.policy_status_topic,
        STATUS_PARTITION,
        since_ms=since_ms - int(within_s * 1000),
        timeout=timeout,
        purpose="policy-status-reader",
    ):
        key = (msg.key() or b"").decode("utf-8", "replace")
        try:
            latest[key] = decode_status(msg.key(), msg.value())
        except StatusRecordError:
            invalid += 1
            latest.pop(key, None)
    live = {
        k: s for k, s in latest.items() if s is not None and s.at >= since_ms
    }  # fmt: skip
    return {"workers": live, "invalid": invalid}


def worker_state(
    status: CustomerStatus | None, version: int, digest: str
) -> tuple[str, str | None]:
    """(state, reason) of one worker for a published ``version`` with ``digest``.

    applied: holds that version as that document; lagging: an older one (or none yet);
    refused: was given it (or newer) and does not apply it; different_digest: holds a
    document of the same number that is not the published one; ahead: a newer version than
    the one read as published; missing: the worker does not serve the customer.
    """
    if status is None:
        return "missing", "the customer is not in this worker's customers file"
    refused = status.refused
    if status.version == version and status.digest != digest:
        return "different_digest", f"holds a different document as v{version}"
    if refused is not None and refused.version >= version:
        return "refused", refused.reason
    if status.version is None or status.version < version:
        return "lagging", None
    if status.version > version:
        return "ahead", None
    return "applied", None


def applied_view(
    customer: str,
    version: int,
    digest: str,
    workers: Iterable[WorkerStatus],
    stale_s: float,
) -> dict[str, Any]:
    """What the API says of a customer's published version: who applies it, who does not."""
    rows = []
    flags: dict[str, list[str]] = {}
    for w in sorted(workers, key=lambda w: w.worker):
        cs = w.customers.get(customer)
        state, reason = worker_state(cs, version, digest)
        if state != "applied":
            flags.setdefault(state, []).append(w.worker)
        rows.append(
            {
                "worker": w.worker,
                "heard_at": format_time(datetime.fromtimestamp(w.at / 1000, UTC)),
                "version": cs.version if cs else None,
                "digest": cs.digest if cs else None,
                "state": state,
                "reason": reason,
            }
        )
    return {
        "version": version,
        "digest": digest,
        "applied_by": sum(1 for r in rows if r["state"] == "applied"),
        "workers": len(rows),
        "stale_after_s": stale_s,
        "by_worker": rows,
        "not_applied": flags,
    }
