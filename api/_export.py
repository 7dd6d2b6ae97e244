"""Export (scope ``export``): a customer's rows as JSON Lines or CSV, streamed page by page."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from mailmeta.api._auth import Principal, require
from mailmeta.api._deps import CustomerQuery, CustomersDep, StoreDep, known, time_range
from mailmeta.schema import FIELD_NAMES

router = APIRouter()


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
    total = store.count_export(customer, lo, hi)
    pages = store.export_pages(customer, lo, hi)
    if format == "jsonl":
        body, media = _jsonl(pages), "application/x-ndjson"
    else:
        body, media = _csv(pages), "text/csv; charset=utf-8"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        body,
        media_type=media,
        headers={
            # Rows visible when the export began (a progress bar's total, not a promise).
            "X-Mailmeta-Rows": str(total),
            "Content-Disposition": f'attachment; filename="{customer}-{stamp}.{format}"',
        },
    )
