"""Erasure and a shortened retention are physical when they return: the erased values are in
no file under the ClickHouse data directory, not only out of every SELECT.

A mutation writes new parts and leaves the replaced ones (with the erased rows) on disk, and
ClickHouse keeps each mutation's text in ``mutation_N.txt``; the store must clear both. Each
test first finds the value on disk (positive control: the scan sees LZ4-compressed parts,
compact and wide), then erases and scans every file again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import clickhouse_connect
import lz4.block
import pytest
from clickhouse_connect.driver.client import Client

from mailmeta.store import ClickHouseStore
from tests.test_storage_store import RETENTION
from tests.test_store import event


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "ch"


@pytest.fixture
def store(data: Path) -> Iterator[ClickHouseStore]:
    with ClickHouseStore(f"chdb://{data}", RETENTION) as s:
        yield s


@pytest.fixture
def raw(store: ClickHouseStore, data: Path) -> Iterator[Client]:
    client = clickhouse_connect.get_client(dsn=f"chdb://{data}")
    try:
        yield client
    finally:
        client.close()


def _blocks(raw: bytes) -> bytes:
    """The decompressed content of ``raw`` if it is a chain of ClickHouse compressed blocks
    (16-byte checksum, method, compressed and plain sizes, data), else b"". LZ4 stores a
    repeat within a block as a back-reference: a plain scan may miss a value that is there."""
    out, at = [], 0
    while at + 25 <= len(raw):
        method = raw[at + 16]
        size = int.from_bytes(raw[at + 17 : at + 21], "little")
        plain = int.from_bytes(raw[at + 21 : at + 25], "little")
        body = raw[at + 25 : at + 16 + size]
        if size < 9 or at + 16 + size > len(raw):
            return b""
        if method == 0x82:
            try:
                out.append(lz4.block.decompress(body, uncompressed_size=plain))
            except lz4.block.LZ4BlockError:
                return b""
        elif method == 0x02:
            out.append(body)
        else:
            return b""
        at += 16 + size
    return b"".join(out)


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """Every file under ``root`` holding ``needle``, as stored or decompressed."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            if needle in content or needle in _blocks(content):
                hits.append(path)
    return hits


def on_disk(uid: str) -> bytes:
    """An event id as a UUID column stores it: two little-endian 64-bit halves."""
    b = uuid.UUID(uid).bytes
    return b[7::-1] + b[:7:-1]


def table_dir(raw: Client, table: str) -> Path:
    path = raw.query(
        "SELECT data_paths[1] FROM system.tables WHERE database = currentDatabase() "
        "AND name = {t:String}",
        parameters={"t": table},
    ).result_rows[0][0]
    return Path(path).resolve()


def part_types(raw: Client, table: str) -> set[str]:
    rows = raw.query(
        "SELECT DISTINCT part_type FROM system.parts WHERE database = currentDatabase() "
        "AND table = {t:String} AND active",
        parameters={"t": table},
    ).result_rows
    return {r[0] for r in rows}


@pytest.mark.parametrize("part_type", ["Compact", "Wide"])
def test_erasure_by_address_leaves_the_row_in_no_file(
    store: ClickHouseStore, raw: Client, data: Path, part_type: str
) -> None:
    if part_type == "Wide":
        raw.command(
            "ALTER TABLE messages MODIFY SETTING min_bytes_for_wide_part = 0, "
            "min_rows_for_wide_part = 0"
        )
    canary = f"ERASE-ME-SUBJECT-{uuid.uuid4().hex}"
    victim = event(subject=canary, mail_from="victim@sender.example")
    kept = event(subject="kept", mail_from="someone@sender.example")
    store.insert_events([victim, kept])
    store.insert_events([victim])  # a second copy, in a second part
    raw.command("OPTIMIZE TABLE messages")  # and a merge: outdated parts exist already
    assert part_types(raw, "messages") == {part_type}
    assert files_containing(data, canary.encode())  # positive control
    # The address as stored (HMAC'd) names the person as well as the clear one does.
    assert victim.mail_from is not None
    form = victim.mail_from.encode()
    assert files_containing(data, form)

    started = time.monotonic()
    erased = store.erase("acme", addresses=event.forms("acme", "victim@sender.example"))
    took = time.monotonic() - started
    assert erased.rows >= 1
    assert [r["subject"] for r in store.query_messages("acme")] == ["kept"]
    assert files_containing(data, canary.encode()) == []
    # The stored form that matched survives only in the erasure log (by design, for
    # ERASURE_LOG_DAYS, so a replay cannot bring the row back), not in a mutation's text.
    log_dir = table_dir(raw, "erasure_log")
    held = files_containing(data, form)
    assert held and all(log_dir in p.resolve().parents for p in held), held
    assert took < 5, f"erasure took {took:.1f}s"
    detached = "SELECT count() FROM system.detached_parts WHERE database = currentDatabase()"
    assert raw.query(detached).result_rows == [(0,)]  # nothing set aside either


def test_erase_everything_removes_rows_aggregates_and_the_logs_forms_from_disk(
    store: ClickHouseStore, raw: Client, data: Path
) -> None:
    # beta stores senders clear: the clear address is on disk, in rows and then in the log.
    canary = f"ERASE-ME-SUBJECT-{uuid.uuid4().hex}"
    address = f"erase-{uuid.uuid4().hex}@sender.example"
    first = event("beta", mail_from=address, subject="first")
    last = event("beta", subject=canary)
    other = event("long", subject="other customer")
    store.insert_events([first, last, other])
    assert store.erase("beta", addresses=event.forms("beta", address)).rows == 1
    # Positive controls: the subject in a part, the address in the erasure log's part, the
    # event id in the hourly aggregates (and the row).
    assert files_containing(data, canary.encode())
    assert files_containing(data, address.encode())
    hourly = table_dir(raw, "hourly_events")
    found = files_containing(data, on_disk(last.event_id))
    assert any(hourly in p.resolve().parents for p in found), (hourly, found)

    erased = store.erase("beta", everything=True)
    assert erased.rows == 1 and erased.aggregate_rows == 2
    for value in (
        canary.encode(),
        address.encode(),
        on_disk(last.event_id),
        on_disk(first.event_id),
    ):
        assert files_containing(data, value) == [], value
    assert files_containing(data, on_disk(other.event_id))  # another customer's rows stay


def test_shortened_retention_leaves_expired_rows_in_no_file(
    store: ClickHouseStore, raw: Client, data: Path
) -> None:
    canary = f"EXPIRE-ME-SUBJECT-{uuid.uuid4().hex}"
    old = event(age=timedelta(days=40), subject=canary)
    young = event(age=timedelta(days=10), subject="young")
    store.insert_events([old, young])
    assert files_containing(data, canary.encode())  # positive control

    change = store.set_retention("acme", 30)
    assert (change.rows_expired, change.rows_updated) == (1, 1)
    assert files_containing(data, canary.encode()) == []
    assert [r["subject"] for r in store.query_messages("acme")] == ["young"]


def test_erasing_the_audit_log_leaves_it_in_no_file(
    store: ClickHouseStore, raw: Client, data: Path
) -> None:
    marker = f"AUDIT-{uuid.uuid4().hex}"
    store.append_audit("op", "retention", "acme", {"note": marker})
    assert files_containing(data, marker.encode())  # positive control
    assert store.erase_audit("acme") == 1
    assert files_containing(data, marker.encode()) == []
