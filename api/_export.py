"""Export (scope ``export``): a customer's rows as JSON Lines or CSV, streamed page by page.

Each export holds a page of rows and a store cursor for as long as its client reads, so the
number running at once is bounded per customer and in all (``ExportSlots``); one more is
refused with 429 and ``Retry-After`` instead of growing the process that serves everyone.
"""

from __future__ import annotations

import csv
import io
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mailmeta.api import _metrics as metrics
from mailmeta.api._deps import CustomerQuery, CustomersDep, StoreDep, known, time_range
from mailmeta.api._principals import Principal, require
from mailmeta.schema import FIELD_NAMES

router = APIRouter()

# What a refused export is told to wait: exports of a busy customer take seconds to minutes.
RETRY_AFTER_S = 10


class ExportSlots:
    """Counts the exports running, per customer and in all, in this process."""

    def __init__(self, per_customer: int, total: int) -> None:
        if per_customer < 1 or total < 1:
            raise ValueError("export limits must be >= 1")
        self.per_customer = per_customer
        self.total = total
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def running(self, customer: str | None = None) -> int:
        with self._lock:
            if customer is None:
                return sum(self._running.values())
            return self._running.get(customer, 0)

    def take(self, customer: str) -> None:
        """Hold a slot for ``customer``, or raise 429 when none is free."""
        with self._lock:
            if sum(self._running.values()) >= self.total:
                raise _busy("too many exports are running; retry later")
            if self._running.get(customer, 0) >= self.per_customer:
                raise _busy("too many exports of this customer are running; retry later")
            self._running[customer] = self._running.get(customer, 0) + 1

    def give_back(self, customer: str) -> None:
        with self._lock:
            left = self._running.get(customer, 0) - 1
            if left > 0:
                self._running[customer] = left
            else:
                self._running.pop(customer, None)


def _busy(message: str) -> HTTPException:
    metrics.RATE_LIMITED.labels(limit="export").inc()
    return HTTPException(429, message, {"Retry-After": str(RETRY_AFTER_S)})


class _HeldStream(StreamingResponse):
    """A streaming response that gives its export slot back however it ends: finished,
    failed, or cut short by the client (the ASGI call returns or raises in every case)."""

    def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _jsonl(pages: Iterator[list[dict[str, Any]]]) -> Iterator[bytes]:
    for page in pages:
        yield b"".join(orjson.dumps(m) + b"\n" for m in page)


# A spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV injection");
# subjects and addresses come from whoever sent the mail.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    if isinstance(value, list):
        value = orjson.dumps(value).decode()
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value  # shown as text; the quote tells a reader it was neutralised
    return value


def _csv(pages: Iterator[list[dict[str, Any]]]) -> Iterator[bytes]:
    buf = io.StringIO()
    # RFC 4180 line ends: the writer then quotes any value holding a CR or an LF.
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(FIELD_NAMES)
    for page in pages:
        for m in page:
            writer.writerow([_csv_cell(m[f]) for f in FIELD_NAMES])
        yield buf.getvalue().encode()
        buf.seek(0)
        buf.truncate()
    if buf.tell():
        yield buf.getvalue().encode()


@router.get("/v1/export")
def export(
    request: Request,
    principal: Annotated[Principal, Depends(require("export"))],
    store: StoreDep,
    customers: CustomersDep,
    customer: Annotated[str, CustomerQuery],
    since: Annotated[datetime | None, Query(alias="from")] = None,
    until: Annotated[datetime | None, Query(alias="to")] = None,
    format: Annotated[Literal["jsonl", "csv"], Query()] = "jsonl",
) -> StreamingResponse:
    principal.check_customer(customer)
    known(customers, customer)
    lo, hi = time_range(since, until)
    slots: ExportSlots = request.app.state.export_slots
    slots.take(customer)
    try:
        total = store.count_export(customer, lo, hi)
        pages = store.export_pages(customer, lo, hi)
    except BaseException:
        slots.give_back(customer)
        raise
    if format == "jsonl":
        body, media = _jsonl(pages), "application/x-ndjson"
    else:
        body, media = _csv(pages), "text/csv; charset=utf-8"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return _HeldStream(
        lambda: slots.give_back(customer),
        body,
        media_type=media,
        headers={
            # Rows visible when the export began (a progress bar's total, not a promise).
            "X-Mailmeta-Rows": str(total),
            "Content-Disposition": f'attachment; filename="{customer}-{stamp}.{format}"',
        },
    )
