"""The DDL every migration produces, per layout, is the one it always produced.

tests/store_ddl.json holds each migration's statements (whitespace collapsed) as the code
before the structured migrations (store/_migrations.py) generated them: single node, a
cluster, and the emulated cluster the chdb tests run. A database migrated by an older
mailmeta must end with the schema a new one would create, so a step's text may only change
with a new migration.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailmeta.store._layout import SINGLE_NODE, Cluster, Layout
from mailmeta.store._migrations import LEDGER, MIGRATIONS

GOLDEN = json.loads((Path(__file__).parent / "store_ddl.json").read_text())
LAYOUTS: dict[str, Layout] = {
    "single": SINGLE_NODE,
    "cluster": Cluster("mailmeta"),
    "emulated": Cluster("one", emulated=True),
}


def norm(sql: str) -> str:
    return " ".join(sql.split())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_migration_generates_the_ddl_it_always_did(layout: str) -> None:
    got = {"0": [norm(s) for s in LEDGER.ddl(LAYOUTS[layout])]}
    for m in MIGRATIONS:
        got[str(m.version)] = [norm(s) for s in m.ddl(LAYOUTS[layout])]
    # Migrations added since are not pinned here; none of those recorded may change.
    assert {v: got[v] for v in GOLDEN[layout]} == GOLDEN[layout]
