"""`erase --all` through the API on the real store (issue 14.2): every table that holds
something of the customer is checked after the erasure, and the other customer is untouched.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from tests.api_helpers import ApiServer, event, per_table
from tests.test_storage_physical import files_containing


@pytest.fixture
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path_factory.mktemp("erase")).start()
    try:
        yield server
    finally:
        server.stop()


def test_erase_all_leaves_only_the_fact_of_the_erasure(api: ApiServer) -> None:
    policy: dict[str, Any] = {"mail_from": "hmac", "subject": "keep"}
    for v in (1, 2, 3):  # three versions of acme's policy; 3 is in force
        api.store.record_policy_version("acme", v, policy, "ops", "api")
    api.store.record_policy_version("globex", 1, policy, "ops", "config")
    api.store.insert_events(
        [event("acme", age=timedelta(hours=h)) for h in (0, 1, 30)] + [event("globex")]
    )
    acme_token = api.token("acme", "messages:read", "stats:read")
    globex_token = api.token("globex", "messages:read")
    with api.client(acme_token) as c:
        assert c.get("/v1/messages").json()["messages"]
    with api.client(api.operator) as op:
        assert op.put("/v1/retention/acme", json={"days": 30}).status_code == 200
    api.auth.access.flush()
    acme_id = acme_token.split("_")[1]
    assert api.store.read_access(acme_id)
    before = per_table(api, "acme")
    assert before["messages"] == 3 and before["audit_log"] >= 2 and before["policy_versions"] == 3
    assert before["api_tokens"] >= 1 and any("hourly" in t and n for t, n in before.items())
    globex_before = per_table(api, "globex")

    with api.client(api.operator) as op:
        r = op.post("/v1/erase", json={"customer": "acme", "all": True})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["rows_removed"] == 3 and result["aggregate_rows_removed"] >= 2
    assert result["policy_versions_removed"] == 2
    assert result["tokens_revoked"] == 1
    assert result["access_log_entries_removed"] >= 1
    assert result["audit_entries_removed"] == before["audit_log"]

    after = per_table(api, "acme")
    assert after.pop("audit_log") == 1
    assert after.pop("policy_versions") == 1  # the version in force (3)
    assert list(api.store.policy_versions("acme")) == [3]
    tokens = [t for t in api.store.load_tokens() if t.customer_id == "acme"]
    assert tokens and all(t.revoked_at is not None for t in tokens)
    after.pop("api_tokens")
    # Settings in force stay while the customer is configured, like its current policy.
    assert after.pop("retention_overrides") == 1
    # The erasure log records this erasure so that a replay cannot bring the rows back.
    assert after.pop("erasure_log", 1) == 1
    assert after == dict.fromkeys(after, 0), after
    assert api.store.read_access(acme_id) == []
    [audit] = api.store.read_audit("acme")
    assert audit["action"] == "erase" and audit["details"]["scope"] == "all"

    # The customer's token is refused at once; the other customer lost nothing.
    with api.client(acme_token) as c:
        assert c.get("/v1/messages").status_code == 401
    with api.client(globex_token) as c:
        assert len(c.get("/v1/messages").json()["messages"]) == 1
    globex_after = per_table(api, "globex")
    assert globex_after == globex_before


def test_erase_and_shorter_retention_through_the_api_leave_the_rows_in_no_file(
    api: ApiServer,
) -> None:
    """The routes return once the rows are off the disk (issue 21.4), not only out of queries."""
    erased = f"ERASE-ME-SUBJECT-{uuid.uuid4().hex}"
    expired = f"EXPIRE-ME-SUBJECT-{uuid.uuid4().hex}"
    api.store.insert_events(
        [
            event("acme", mail_from="victim@sender.example", subject=erased),
            event("acme", age=timedelta(days=40), subject=expired),
            event("acme", subject="kept"),
        ]
    )
    for canary in (erased, expired):  # positive controls: the scan sees the stored rows
        assert files_containing(api.chdb_dir, canary.encode())
    with api.client(api.operator) as op:
        r = op.post("/v1/erase", json={"customer": "acme", "address": "victim@sender.example"})
        assert r.status_code == 200 and r.json()["rows_removed"] == 1, r.text
        assert files_containing(api.chdb_dir, erased.encode()) == []
        assert op.put("/v1/retention/acme", json={"days": 30}).status_code == 200
        assert files_containing(api.chdb_dir, expired.encode()) == []
        subjects = [m["subject"] for m in op.get("/v1/messages?customer=acme").json()["messages"]]
    assert subjects == ["kept"]
