"""`mailmeta retention …`, `mailmeta erase`, `mailmeta export`: storage, through the API."""

from __future__ import annotations

import os
import sys
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import httpx
import typer

from mailmeta.cli._app import app
from mailmeta.cli._client import ApiClient, ApiOption, TokenOption, fail

retention_app = typer.Typer(help="Show or change how long customers' rows are kept.")
app.add_typer(retention_app, name="retention", no_args_is_help=True)

CustomerOption = Annotated[str, typer.Option("--customer", "-c", help="Customer id.")]


@retention_app.command("show")
def retention_show(api: ApiOption = None, token: TokenOption = None) -> None:
    """The retention in force per customer (the customers file, or `retention set`)."""
    with ApiClient(api, token) as client:
        body = client.get("/v1/retention")
    for customer, days in sorted(body["retention_days"].items()):
        typer.echo(f"{customer}\t{days} days")


@retention_app.command("set")
def retention_set(
    customer: Annotated[str, typer.Argument(help="Customer id.")],
    days: Annotated[int, typer.Argument(help="Days rows are kept (1..3650).", min=1, max=3650)],
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Keep CUSTOMER's rows DAYS days: new rows, and stored ones too (a shorter retention
    removes the rows already past it, now)."""
    with ApiClient(api, token, timeout=600.0) as client:
        r = client.request("PUT", f"/v1/retention/{customer}", json={"days": days})
    body = r.json()
    typer.echo(
        f"{customer}: retention {body['previous_days']} -> {body['retention_days']} days; "
        f"{body['rows_updated']} stored row(s) updated, {body['rows_expired']} removed as expired"
    )
    for warning in body.get("warnings", []):
        typer.echo(f"warning: {warning}", err=True)


@app.command()
def erase(
    customer: CustomerOption,
    address: Annotated[
        str | None,
        typer.Option(help="Erase rows with this sender or recipient (clear; hashed forms match)."),
    ] = None,
    message_id: Annotated[
        str | None, typer.Option(help="Erase the rows of this Message-ID.")
    ] = None,
    all_: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Erase all of the customer's rows, aggregates, old policy versions, audit"
            " records and access log, and revoke its tokens.",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before --all.")] = False,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Physically delete a customer's rows on request, and report how many went."""
    given = [
        n for n, v in (("--address", address), ("--message-id", message_id), ("--all", all_)) if v
    ]
    if len(given) != 1:
        fail("give exactly one of --address, --message-id, --all", code=2)
    if all_ and not yes:
        if not sys.stdin.isatty():
            fail("--all erases everything of the customer: confirm with --yes", code=2)
        typer.confirm(
            f"Erase ALL rows, aggregates, policy history and audit records of {customer!r}"
            " and revoke its tokens?",
            abort=True,
        )
    body: dict[str, Any] = {"customer": customer}
    if address is not None:
        body["address"] = address
    elif message_id is not None:
        body["message_id"] = message_id
    else:
        body["all"] = True
    with ApiClient(api, token, timeout=600.0) as client:
        result = client.post("/v1/erase", json=body)
    line = f"{customer}: erased {result['rows_removed']} row(s)"
    if all_:
        line += (
            f", {result['aggregate_rows_removed']} aggregate row(s),"
            f" {result['policy_versions_removed']} old policy version(s),"
            f" {result['access_log_entries_removed']} access-log record(s),"
            f" {result['audit_entries_removed']} audit record(s) (replaced by this erasure's);"
            f" {result['tokens_revoked']} token(s) revoked"
        )
    typer.echo(line)


class ExportFormat(StrEnum):
    jsonl = "jsonl"
    csv = "csv"


def _when(option: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option}: {value!r} is not an ISO-8601 date or time (e.g. 2026-01-31T12:00Z)", 2)
    return value


def _error_of(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return f"{r.status_code}: {r.text}"
    problems = "".join(
        f"\n  {p.get('param')}: {p.get('problem')}" for p in body.get("problems", [])
    )
    return f"{r.status_code}: {body.get('error') or r.text}{problems}"


@app.command()
def export(
    customer: CustomerOption,
    since: Annotated[
        str | None, typer.Option("--from", help="From this time (ISO-8601; UTC if no zone).")
    ] = None,
    until: Annotated[str | None, typer.Option("--to", help="Up to (excluding) this time.")] = None,
    format: Annotated[ExportFormat, typer.Option("--format", help="jsonl or csv.")] = (
        ExportFormat.jsonl
    ),
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write here (default: stdout).")
    ] = None,
    api: ApiOption = None,
    token: TokenOption = None,
) -> None:
    """Stream a customer's stored rows (oldest first), with a progress bar on a terminal."""
    params: dict[str, str] = {"customer": customer, "format": format.value}
    if (s := _when("--from", since)) is not None:
        params["from"] = s
    if (u := _when("--to", until)) is not None:
        params["to"] = u
    # Written beside the target and renamed at the end: a failed export leaves no half file.
    partial = out.with_name(f".{out.name}.partial") if out is not None else None
    with ApiClient(api, token, timeout=600.0) as client:
        try:
            with client.http.stream("GET", "/v1/export", params=params) as r:
                if r.status_code >= 400:
                    r.read()
                    fail(_error_of(r))
                total = int(r.headers.get("X-Mailmeta-Rows", "0"))
                sink: BinaryIO = _private_file(partial) if partial else sys.stdout.buffer
                try:
                    rows = _copy(r, sink, total, show=sys.stderr.isatty())
                finally:
                    if partial:
                        sink.close()
        except httpx.ConnectError:
            _discard(partial)
            fail(f"cannot reach the mailmeta API at {client.base} (is `mailmeta up` running?)")
        except (httpx.HTTPError, OSError) as exc:
            _discard(partial)
            fail(f"export failed: {exc}")
        except BaseException:
            _discard(partial)
            raise
    if out is not None and partial is not None:
        os.replace(partial, out)
        typer.echo(f"{customer}: exported {rows} row(s) to {out}", err=True)


def _private_file(path: Path) -> BinaryIO:
    """``path`` opened for writing, readable by its owner only (exports hold customer data)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask, and for a file left by an earlier run
    return os.fdopen(fd, "wb")


def _discard(partial: Path | None) -> None:
    if partial is not None:
        partial.unlink(missing_ok=True)


class _RowCounter:
    """Counts records in a streamed body: lines for JSONL; for CSV only the line ends
    outside quotes (a value may hold newlines; doubled quotes keep the parity right)."""

    def __init__(self, csv: bool) -> None:
        self.csv = csv
        self.rows = -1 if csv else 0  # the CSV header is not a row
        self._quoted = False

    def feed(self, chunk: bytes) -> int:
        if not self.csv:
            n = chunk.count(b"\n")
        else:
            n = 0
            for i, part in enumerate(chunk.split(b'"')):
                if i:
                    self._quoted = not self._quoted
                if not self._quoted:
                    n += part.count(b"\n")
        self.rows += n
        return n


def _copy(r: httpx.Response, sink: BinaryIO, total: int, *, show: bool) -> int:
    """Copy the body to ``sink``; returns the number of rows."""
    counter = _RowCounter(r.headers.get("content-type", "").startswith("text/csv"))
    if not show:
        for chunk in r.iter_bytes():
            sink.write(chunk)
            counter.feed(chunk)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        columns = (BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=True, console=_stderr_console()) as progress:
            task = progress.add_task("export", total=total or None)
            for chunk in r.iter_bytes():
                sink.write(chunk)
                progress.advance(task, counter.feed(chunk))
    sink.flush()
    return max(0, counter.rows)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)
