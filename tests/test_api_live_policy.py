"""The API describes and searches by the redaction policy in force, not the customers file's.

An operator changes a customer's policy through the API (a new version on a real broker's
policies topic, as in the sink); rows are raw events redacted by the real redactor, which
takes the new version from the topic as a redaction worker does, and inserted through the
store as the sink inserts them. Tokens are on: the customer asks with its own token.

After the change, ``/v1/me`` describes the new version; a search by sender finds rows stored
before (clear) and after (HMAC) it; a search by recipient, masked by the file's policy and kept
by the new one, finds the rows stored since (the file's policy alone would refuse it); the
dashboard's data tags each row by its own version. A change published by another replica is
seen within the cache's bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mailmeta.api._in_force import TTL_S
from mailmeta.config import Customer, Customers, Policy, Settings
from mailmeta.policy import PolicyLog, PolicyRecord, Redactor, hmac_tagged
from mailmeta.schema import format_time
from tests.api_helpers import ApiServer
from tests.event_helpers import Redacted
from tests.kafka_helpers import wait_until

pytestmark = [pytest.mark.kafka]

SENDER = "alice@sender.example"
RCPT = "bob@initech.example"
FILE_POLICY = {"mail_from": "keep", "rcpt_to": "mask", "message_id": "keep", "subject": "keep"}
NEW_POLICY = {"mail_from": "hmac", "rcpt_to": "keep", "message_id": "keep", "subject": "drop"}
CUSTOMERS = Customers(
    [
        Customer(
            id="initech",
            domains=["initech.example"],
            retention_days=30,
            hmac_key="initech-test-hmac-key-0123456789abcdef",
            policy_version=1,
            policy=FILE_POLICY,
        )
    ]
)


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path, customers=CUSTOMERS)
    server.install_policies(settings, CUSTOMERS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _store(api: ApiServer, rows: Redacted, subject: str, n: int = 2) -> None:
    """``n`` raw events redacted by the redactor's version in force, stored as the sink does."""
    events = [
        rows(
            "initech",
            message_id=f"<{subject.replace(' ', '-')}-{i}@mx.example>",
            subject=subject,
            mail_from=SENDER,
            rcpt_to=[RCPT],
        )
        for i in range(n)
    ]
    api.store.insert_events(events)


def _actions(me: dict[str, Any]) -> tuple[int, dict[str, str]]:
    [c] = me["customers"]
    return c["redaction"]["policy_version"], c["redaction"]["actions"]


def _worker_takes(settings: Settings, redactor: Redactor, version: int) -> None:
    """What a redaction worker does: the customer's record from the policies topic."""
    rec = PolicyLog(settings).read_all()["initech"]
    assert rec.version == version
    assert redactor.update(rec.customer_id, rec.policy, rec.version)


def test_me_and_search_follow_the_policy_in_force(api: ApiServer, settings: Settings) -> None:
    rows = Redacted(CUSTOMERS)
    _store(api, rows, "Before change")
    reader = api.token("initech", "messages:read", name="initech-reader")
    with api.client(reader) as c:
        version, actions = _actions(c.get("/v1/me").json())
        assert version == 1 and actions["mail_from"] == "keep" and actions["rcpt_to"] == "mask"
        # The file masks recipients: nothing stored can match an exact recipient yet.
        assert c.get("/v1/messages", params={"recipient": RCPT}).status_code == 400

    with api.client(api.operator) as op:
        r = op.put("/v1/policies/initech", json={"policy": NEW_POLICY, "expected_version": 1})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2
    _worker_takes(settings, rows.redactor, 2)
    _store(api, rows, "After change")

    with api.client(reader) as c:
        version, actions = _actions(c.get("/v1/me").json())
        assert version == 2
        assert actions["mail_from"] == "hmac" and actions["subject"] == "drop"
        assert actions["rcpt_to"] == "keep"
        _check_searches(c)
        _check_dashboard_data(c)


def _check_searches(c: Any) -> None:
    key_id, key = next(iter(CUSTOMERS.by_id["initech"].keys().items()))
    found = c.get("/v1/messages", params={"sender": SENDER})
    assert found.status_code == 200, found.text
    rows = found.json()["messages"]
    # Both versions' rows: clear under version 1, HMAC'd under version 2.
    assert sorted((r["policy_version"], r["mail_from"]) for r in rows) == [
        (1, SENDER),
        (1, SENDER),
        (2, hmac_tagged(key_id, key, SENDER)),
        (2, hmac_tagged(key_id, key, SENDER)),
    ]
    assert {r["subject"] for r in rows} == {"Before change", None}
    # Recipients are kept since version 2: the rows stored since match.
    found = c.get("/v1/messages", params={"recipient": RCPT})
    assert found.status_code == 200, found.text
    assert [r["policy_version"] for r in found.json()["messages"]] == [2, 2]
    # Subjects are dropped now, but version 1 kept them: its rows still match.
    found = c.get("/v1/messages", params={"subject": "before"})
    assert found.status_code == 200, found.text
    assert [r["policy_version"] for r in found.json()["messages"]] == [1, 1]


def _check_dashboard_data(c: Any) -> None:
    page = c.get("/v1/messages").json()
    by_version = page["redaction_by_version"]
    assert set(by_version) == {"1", "2"}
    assert by_version["1"]["actions"]["mail_from"] == "keep"
    assert by_version["2"]["actions"]["mail_from"] == "hmac"
    old = next(r for r in page["messages"] if r["policy_version"] == 1)
    detail = c.get(f"/v1/messages/{old['event_id']}").json()
    assert detail["redaction"]["policy_version"] == 2  # in force
    assert detail["stored_redaction"]["policy_version"] == 1  # how this row was redacted
    assert detail["stored_redaction"]["actions"]["subject"] == "keep"


def test_a_change_through_another_replica_is_seen_within_the_bound(
    api: ApiServer, settings: Settings
) -> None:
    reader = api.token("initech", "messages:read", name="initech-reader")
    with api.client(reader) as c:
        assert _actions(c.get("/v1/me").json())[0] == 1
        # Another replica's PUT: the record on the topic, then the version in the store.
        policy = Policy.model_validate(NEW_POLICY)
        rec = PolicyRecord("initech", 2, policy, "other-replica", format_time(datetime.now(UTC)))
        PolicyLog(settings).publish([rec])
        api.store.record_policy_version("initech", 2, policy.document(), rec.actor, "api")
        # The cache's bound, plus slack for a loaded machine's requests.
        wait_until(
            lambda: _actions(c.get("/v1/me").json())[0] == 2,
            timeout=TTL_S + 5,
            what="/v1/me describing version 2",
        )
        assert _actions(c.get("/v1/me").json())[1]["mail_from"] == "hmac"
