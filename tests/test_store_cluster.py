"""ClickHouse cluster mode (store/_layout.py): the generated DDL, and the store run on it.

No ClickHouse server or Keeper runs on these machines, so replication and ON CLUSTER DDL
cannot run here. What does run: every generated statement through ClickHouse's own parser
(chdb's formatQuery), and the whole store on the cluster layout (local tables behind
Distributed ones, mutations on the local tables, views local to local) over a one-shard
local cluster in chdb, with plain engines in place of the replicated ones, compared
operation by operation with the single-server schema. chdb cannot hold two shards: a
shard with its own database is never local (it needs a TCP server chdb has none of), and
two local shards share one database, so each would read the other's rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import chdb
import clickhouse_connect
import pytest

from mailmeta.store import MIGRATIONS, ClickHouseStore, SearchFilter, StoreError
from mailmeta.store._layout import EVERY_NODE, LOCAL_SUFFIX, SHARDING_KEYS, SINGLE_NODE, Cluster
from mailmeta.store._migrations import LEDGER, Statement
from mailmeta.store._tables import HOURLY_TABLE
from mailmeta.store._tokens import AccessRecord, TokenRecord
from tests.event_helpers import raw_event
from tests.test_store import POLICY, event

RETENTION = {"acme": 60, "beta": 30}
CLUSTER = Cluster("mailmeta")
_ON = " ON CLUSTER `mailmeta`"


def all_statements(cluster: Cluster | None) -> list[str]:
    layout = SINGLE_NODE if cluster is None else cluster
    return [*LEDGER.ddl(layout), *(s for m in MIGRATIONS for s in m.ddl(layout))]


def created(statements: list[str]) -> dict[str, str]:
    out = {}
    for sql in statements:
        if m := re.match(r"\s*CREATE (?:TABLE|MATERIALIZED VIEW) IF NOT EXISTS (\w+)", sql):
            out[m[1]] = sql
    return out


def order_by(sql: str) -> set[str]:
    m = re.search(r"ORDER BY \(?([\w, ]+?)\)?\s*(?:\n|TTL|SETTINGS|PARTITION|$)", sql)
    assert m, sql
    return {c.strip() for c in m[1].split(",")}


def columns_and_tail(sql: str) -> tuple[str, str]:
    """The column list and what follows the engine (keys, TTL, settings), spacing ignored."""
    m = re.fullmatch(r"[^(]*(\(.*\))\s*ENGINE = \w+(?:\([^)]*\))?(.*)", sql, re.DOTALL)
    assert m, sql
    return " ".join(m[1].split()), " ".join(m[2].split())


# --- the DDL -------------------------------------------------------------------------------


def test_every_cluster_statement_parses_and_runs_on_the_cluster() -> None:
    statements = all_statements(CLUSTER)
    with chdb.connect(":memory:") as conn:
        for sql in statements:
            # ClickHouse's own parser: raises on anything it cannot parse.
            literal = sql.replace("\\", "\\\\").replace("'", "\\'")
            conn.query(f"SELECT formatQuery('{literal}')")
    for sql in statements:
        head = sql.split("(", 1)[0].split(" AS ", 1)[0]
        if sql.lstrip().startswith(("INSERT", "SELECT")):
            continue  # backfills: through the Distributed tables, as every query
        assert _ON in head, sql


def test_every_table_has_its_cluster_layout() -> None:
    single = created(all_statements(None))
    tables = {n for n, sql in single.items() if "MATERIALIZED VIEW" not in sql}
    # Every table is sharded or on every node, nothing is both, nothing is forgotten.
    assert tables == set(SHARDING_KEYS) | set(EVERY_NODE)
    assert not set(SHARDING_KEYS) & set(EVERY_NODE)
    cluster = created(all_statements(CLUSTER))
    for name in SHARDING_KEYS:
        local, dist = cluster[name + LOCAL_SUFFIX], cluster[name]
        engine = re.search(r"ENGINE = (\w+)\('([^']*)', '([^']*)'", local)
        assert engine, local
        single_engine = re.search(r"ENGINE = (\w+)", single[name])
        assert single_engine
        assert engine[1] == "Replicated" + single_engine[1]
        assert engine[2] == f"/clickhouse/tables/{{shard}}/{{database}}/{name}{LOCAL_SUFFIX}"
        assert engine[3] == "{replica}"
        key = SHARDING_KEYS[name]
        assert dist.endswith(
            f"AS {name}_local ENGINE = Distributed('mailmeta', currentDatabase(), "
            f"{name}_local, {key})"
        )
        # Copies FINAL must collapse share the sorting key: a key over its columns only
        # sends them to one shard.
        used = set(re.findall(r"\w+", key.removeprefix("cityHash64"))) - {"cityHash64"}
        assert used <= order_by(single[name]), (name, key)
        # Everything else of the table is unchanged.
        assert order_by(local) == order_by(single[name])
        assert columns_and_tail(local) == columns_and_tail(single[name])
    for name in EVERY_NODE:
        engine = re.search(r"ENGINE = (\w+)\('([^']*)', '([^']*)'", cluster[name])
        assert engine, cluster[name]
        assert engine[1].startswith("Replicated")
        assert engine[2] == f"/clickhouse/tables/all/{{database}}/{name}"  # no {shard}
        assert engine[3] == "{shard}-{replica}"
        assert name + LOCAL_SUFFIX not in cluster
    assert cluster["hourly_events_mv"].count("_local") == 2  # reads local, writes local
    assert "FROM messages_local" in cluster["hourly_events_mv"]
    assert "TO hourly_events_local" in cluster["hourly_events_mv"]


def test_only_the_legacy_hourly_history_is_left_out() -> None:
    left_out = [
        sql
        for m in MIGRATIONS
        for step in m.steps
        if not step.ddl(CLUSTER)
        for sql in step.ddl(SINGLE_NODE)
    ]
    assert len(left_out) == 3
    assert all(HOURLY_TABLE in sql or "messages_hourly_mv" in sql for sql in left_out)
    assert not any("DROP" in sql for sql in left_out)


def test_bad_cluster_name_and_unknown_statement_are_refused() -> None:
    with pytest.raises(ValueError, match="MAILMETA_CLICKHOUSE_CLUSTER"):
        Cluster("x; DROP TABLE messages")
    with pytest.raises(ValueError, match="no cluster layout"):
        CLUSTER.create_table("other", "(a UInt8)", "MergeTree", "", "ORDER BY a")
    with pytest.raises(ValueError, match="no cluster form"):
        Statement("TRUNCATE TABLE messages").ddl(CLUSTER)
    with pytest.raises(ValueError, match="no cluster form"):
        CLUSTER.insert_select("api_tokens", "SELECT * FROM api_tokens")


def test_the_setting_selects_cluster_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from mailmeta.config import Settings

    monkeypatch.setenv("MAILMETA_CLICKHOUSE_CLUSTER", "mailmeta")
    assert Settings().clickhouse_cluster == "mailmeta"


# --- the store on the cluster layout (chdb, one local shard, plain engines) -----------------

_CONFIG = """<clickhouse>
    <tcp_port>9000</tcp_port>
    <remote_servers>
        <one><shard><replica><host>127.0.0.1</host><port>9000</port></replica></shard></one>
    </remote_servers>
</clickhouse>
"""


class Recording(ClickHouseStore):
    """The store, keeping every statement it sends (to check what reaches the server)."""

    sent: list[str]

    def _command(self, sql: str, parameters: Any = None) -> object:
        self.sent.append(sql)
        return super()._command(sql, parameters)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ClickHouseStore, Recording]]:
    config = tmp_path / "cluster.xml"
    config.write_text(_CONFIG)
    path = tmp_path / "ch"
    path.mkdir()
    # chdb runs one engine per process, started with the first connection's options; the
    # stores' clients then share it (clusters included), each in its own database.
    engine = chdb.connect(f"file:{path}?config-file={config}")
    engine.query("CREATE DATABASE single")
    engine.query("CREATE DATABASE clustered")
    Recording.sent = []
    single = ClickHouseStore(f"chdb://{path}?database=single", RETENTION, cluster="")
    try:
        clustered = Recording(
            f"chdb://{path}?database=clustered", RETENTION, cluster=Cluster("one", emulated=True)
        )
        try:
            yield single, clustered
        finally:
            clustered.close()
    finally:
        single.close()
        engine.close()


def same(stores: tuple[ClickHouseStore, ...], call: Any) -> Any:
    a, b = (call(s) for s in stores)
    assert a == b
    return a


def test_the_store_gives_the_same_answers_on_the_cluster_layout(
    pair: tuple[ClickHouseStore, Recording],
) -> None:
    single, clustered = pair
    stores = (single, clustered)
    tables = {
        r[0]: r[1]
        for r in clustered._rows(  # the layout chdb now holds
            "SELECT name, engine FROM system.tables WHERE database = currentDatabase()"
        )
    }
    assert tables["messages"] == "Distributed" and tables["messages_local"] == "ReplacingMergeTree"
    assert tables["api_tokens"] == "ReplacingMergeTree" and "api_tokens_local" not in tables

    # acme's policy is version 3; a version 4 rewrites the subject "first" to "second".
    raw_twice = raw_event("acme", subject="first")
    v4 = {
        **POLICY,
        "subject": {"action": "keep", "replace": [{"pattern": "first", "with": "second"}]},
    }
    twice = event.of(raw_twice)
    rows = [
        event(age=timedelta(days=10), mail_from="erase@sender.example"),
        event(age=timedelta(days=45)),
        event(age=timedelta(hours=2), status="bounced"),
        event("beta", age=timedelta(days=1)),
        twice,
    ]
    for s in stores:
        s.insert_events(rows)
        # A second version of one event, in another batch: FINAL keeps the newer.
        s.insert_events([event.changed("acme", v4, 4).of(raw_twice)])

    def strip(rows: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
        return [(r["event_id"], r["subject"], r["policy_version"]) for r in rows]

    found = same(stores, lambda s: strip(s.query_messages("acme", limit=100)))
    assert (twice.event_id, "second", 4) in found and len(found) == 4
    same(stores, lambda s: s.count("acme"))  # physical rows
    assert same(stores, lambda s: s.count("acme", visible_only=True)) == 4
    since = datetime.now(UTC) - timedelta(days=60)
    same(stores, lambda s: s.hourly_stats("acme", since, datetime.now(UTC) + timedelta(hours=1)))
    flt = SearchFilter(statuses=("bounced",))
    assert len(same(stores, lambda s: strip(s.search_events("acme", flt, 10)[0]))) == 1
    same(stores, lambda s: s.get_event("acme", twice.event_id))
    same(stores, lambda s: s.count_export("acme"))

    # Retention: 60 -> 30 days removes the 45-day-old row and rewrites the others.
    change = same(stores, lambda s: s.set_retention("acme", 30))
    assert change.rows_expired == 1 and change.rows_updated >= 3

    # Retroactive rewrite of version 3 rows to version 5.
    def upper(row: dict[str, Any]) -> dict[str, Any] | None:
        return dict(row, subject=(row["subject"] or "").upper())

    # Three rows are physically under version 3, but the event stored twice survives as its
    # version 4 copy: only the two events whose surviving copy is version 3 are rewritten
    # (rewriting the old copy would stamp it newer and bring "first" back over "second").
    assert same(stores, lambda s: s.rewrite_stored("acme", [3], 5, upper)) == 2
    assert same(stores, lambda s: s.stored_versions("acme")) == {3: 1, 4: 1, 5: 2}
    found = same(stores, lambda s: strip(s.query_messages("acme", limit=100)))
    assert {subject for _, subject, _ in found} == {"QUARTERLY REPORT", "second"}

    # Erasure by address, then everything of a customer (rows and hourly aggregates).
    erase = event.forms("acme", "erase@sender.example")  # as the API's erase passes it
    assert rows[0].mail_from in erase
    assert same(stores, lambda s: s.erase("acme", addresses=erase)).rows == 1
    assert same(stores, lambda s: s.erase("beta", everything=True)).rows == 1
    for s in stores:  # the erasure log drops a replayed event
        s.insert_events([rows[3]])
    assert same(stores, lambda s: s.count("beta")) == 0
    same(stores, lambda s: s.hourly_stats("beta", since, datetime.now(UTC)))

    for s in stores:
        s.force_ttl_merge()
    assert same(stores, lambda s: s.count("acme")) == 2  # merged: one row per event

    # Control tables: policy history, tokens, the access log, the audit log.
    for s in stores:
        for v in (1, 2, 3):
            # A version names one valid document (the store checks it), each its own.
            doc = {**POLICY, "subject": ("keep", "drop", "length_only")[v - 1]}
            s.record_policy_version("acme", v, doc, "op", "test")
    assert same(stores, lambda s: s.erase_policy_history("acme")) == 2
    assert same(stores, lambda s: list(s.policy_versions("acme"))) == [3]
    now = datetime.now(UTC)
    token = TokenRecord("t1", "n", "acme", frozenset({"read"}), "hash", now)
    for s in stores:
        s.save_token(token)
        s.save_token(TokenRecord("t1", "n", "acme", frozenset({"read"}), "hash", now, now))
        s.append_access([AccessRecord(now, "t1", "GET", "/v1/messages", 200, 1.0)])
        s.append_audit("op", "erase", "acme", {"rows": 1})
    same(stores, lambda s: [t.public() for t in s.load_tokens()])
    same(stores, lambda s: s.tokens_stamp())
    assert same(stores, lambda s: s.erase_access(["t1"])) == 1
    assert same(stores, lambda s: s.erase_audit("acme")) == 1

    # What reached the server: every mutation of a sharded table names its local table,
    # and none calls now() or holds a subquery but the one rewrite that says so.
    alters = [sql for sql in Recording.sent if re.match(r"\s*(ALTER|OPTIMIZE)", sql)]
    assert alters
    for sql in alters:
        target = re.match(r"\s*(?:ALTER|OPTIMIZE) TABLE (\w+)", sql)
        assert target, sql
        name = target[1].removesuffix(LOCAL_SUFFIX)
        assert (target[1] == name + LOCAL_SUFFIX) == (name in SHARDING_KEYS), sql
        assert "now64(" not in sql and "now(" not in sql, sql
        if "SELECT" in sql and "ADD PROJECTION" not in sql:  # a projection's query is no subquery
            assert "allow_nondeterministic_mutations = 1" in sql and "FROM messages_local" in sql


def test_a_database_of_the_other_mode_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "cluster.xml"
    config.write_text(_CONFIG)
    path = tmp_path / "ch"
    path.mkdir()
    engine = chdb.connect(f"file:{path}?config-file={config}")
    try:
        with ClickHouseStore(f"chdb://{path}", RETENTION, cluster=""):
            pass
        with pytest.raises(StoreError, match="single-server schema"):
            ClickHouseStore(f"chdb://{path}", RETENTION, cluster=Cluster("one", emulated=True))
        client = clickhouse_connect.get_client(dsn=f"chdb://{path}")
        try:
            for table in ("messages", "hourly_events_mv"):
                client.command(f"DROP TABLE IF EXISTS {table}")
            client.command(
                "CREATE TABLE messages (a UInt8) ENGINE = Distributed('one', currentDatabase(), x)"
            )
        finally:
            client.close()
        with pytest.raises(StoreError, match="MAILMETA_CLICKHOUSE_CLUSTER"):
            ClickHouseStore(f"chdb://{path}", RETENTION, cluster="")
    finally:
        engine.close()
