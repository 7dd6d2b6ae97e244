"""API tokens: scopes, customer binding, revocation on the next request, hashes at rest,
rate limiting, the access log, the CLI, and the operator-token bootstrap."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mailmeta.api import RateLimiter, ensure_operator_token
from mailmeta.cli import app as cli_app
from tests.api_helpers import ApiServer, event


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path_factory.mktemp("tokens")).start()
    server.store.insert_events([event("acme"), event("globex")])
    try:
        yield server
    finally:
        server.stop()


def test_requests_without_a_valid_token_are_refused(api: ApiServer) -> None:
    for token in (None, "", "mm_000000000000_" + "A" * 43, "not-a-token", api.operator + "x"):
        with api.client(token) as c:
            r = c.get("/v1/messages", params={"customer": "acme"})
        assert r.status_code == 401, token
        assert r.json()["error"] and "messages" not in r.json()
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_revoked_token_fails_on_the_very_next_request(api: ApiServer) -> None:
    token = api.token("acme", "messages:read")
    token_id = token.split("_")[1]
    with api.client(token) as c:
        assert c.get("/v1/messages").status_code == 200
        assert c.get("/v1/messages").status_code == 200  # memoised verification path
        with api.client(api.operator) as op:
            r = op.delete(f"/v1/tokens/{token_id}")
            assert r.status_code == 200 and r.json()["revoked_at"]
        r = c.get("/v1/messages")
        assert r.status_code == 401 and "messages" not in r.json()
    # Still revoked after a reload from ClickHouse (what a restart does).
    assert api.auth.verify(token) is None
    fresh = {t.token_id: t for t in api.store.load_tokens()}
    assert fresh[token_id].revoked_at is not None


def test_scopes_are_enforced(api: ApiServer) -> None:
    stats_only = api.token("acme", "stats:read")
    messages_only = api.token("acme", "messages:read")
    with api.client(stats_only) as c:
        assert c.get("/v1/messages").status_code == 403
        assert c.get("/v1/stats", params={"customer": "acme"}).status_code == 200
        assert c.get("/v1/export", params={"customer": "acme"}).status_code == 403
    with api.client(messages_only) as c:
        assert c.get("/v1/stats", params={"customer": "acme"}).status_code == 403
        assert c.get("/v1/tokens").status_code == 403
        r = c.post("/v1/tokens", json={"customer": None, "scopes": ["admin"]})
        assert r.status_code == 403
    with api.client(api.operator) as op:
        # admin is for operator tokens only; unknown scopes and customers are refused.
        r = op.post("/v1/tokens", json={"customer": "acme", "scopes": ["admin"]})
        assert r.status_code == 400
        assert op.post("/v1/tokens", json={"scopes": ["root"]}).status_code == 400
        r = op.post("/v1/tokens", json={"customer": "nobody", "scopes": ["export"]})
        assert r.status_code == 404


def test_token_list_shows_no_secret_or_hash(api: ApiServer) -> None:
    token = api.token("globex", "export", name="listed")
    with api.client(api.operator) as op:
        body = op.get("/v1/tokens").text
    assert token.split("_")[1] in body
    assert token.split("_", 2)[2] not in body
    assert "argon2" not in body and "hash" not in body


def test_clear_tokens_are_nowhere_at_rest_or_in_logs(
    api: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = api.token("acme", "messages:read", "stats:read")
    secret = token.split("_", 2)[2]
    with api.client(token) as c:
        assert c.get("/v1/messages", params={"sender": "alice@sender.example"}).status_code == 200
    api.auth.access.flush()
    stored = [t for t in api.store.load_tokens() if t.token_id == token.split("_")[1]]
    assert stored and stored[0].secret_hash.startswith("$argon2id$")
    # Every table, every row, as text: neither the token nor its secret.
    tables = [
        r[0]
        for r in api.store._rows(
            "SELECT name FROM system.tables WHERE database = currentDatabase()"
        )
    ]
    assert "api_tokens" in tables and "api_access_log" in tables
    for table in tables:
        for row in api.store._rows(f"SELECT * FROM `{table}`"):
            text = repr(row)
            assert secret not in text and token not in text, table
    # And no file of the database holds it (compressed parts could hide it; the row dump
    # above is the decisive check, this one catches uncompressed logs and metadata).
    for path in api.chdb_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data, path
    assert secret not in caplog.text


def test_rate_limit_answers_429_with_retry_after(api: ApiServer) -> None:
    token = api.token("acme", "messages:read")
    saved = api.auth.limiter
    api.auth.limiter = RateLimiter(rate=0.5, burst=3)
    try:
        with api.client(token) as c:
            codes = [c.get("/v1/me").status_code for _ in range(3)]
            r = c.get("/v1/me")
        assert codes == [200, 200, 200]
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert "error" in r.json()
        with api.client(api.operator) as op:  # buckets are per token
            assert op.get("/v1/me").status_code == 200
    finally:
        api.auth.limiter = saved


def test_access_log_holds_request_metadata_only(api: ApiServer) -> None:
    token = api.token("acme", "messages:read")
    token_id = token.split("_")[1]
    with api.client(token) as c:
        assert c.get("/v1/messages", params={"recipient": "bob@acme.example"}).status_code == 200
        assert c.get("/v1/messages/not-a-uuid").status_code == 404
    api.auth.access.flush()
    rows = api.store.read_access(token_id)
    assert {(r["route"], r["status"]) for r in rows} == {
        ("/v1/messages", 200),
        ("/v1/messages/{event_id}", 404),
    }
    assert all(r["latency_ms"] >= 0 and r["method"] == "GET" for r in rows)
    assert "bob@acme.example" not in repr(api.store._rows("SELECT * FROM api_access_log"))
    ttl = api.store._rows("SHOW CREATE TABLE api_access_log")[0][0]
    assert "toIntervalDay(30)" in ttl


def test_cli_creates_lists_and_revokes(api: ApiServer) -> None:
    runner = CliRunner()
    base = ["--api", api.url, "--token", api.operator]
    r = runner.invoke(
        cli_app,
        [
            "token",
            "create",
            "--customer",
            "acme",
            "--scope",
            "messages:read",
            "--name",
            "cli",
            *base,
        ],
    )
    assert r.exit_code == 0, r.output
    token = r.stdout.strip().splitlines()[-1]
    assert token.startswith("mm_")
    token_id = token.split("_")[1]
    with api.client(token) as c:
        assert c.get("/v1/messages").status_code == 200
    r = runner.invoke(cli_app, ["token", "list", *base])
    assert r.exit_code == 0 and token_id in r.stdout and token.split("_", 2)[2] not in r.stdout
    r = runner.invoke(cli_app, ["token", "revoke", token_id, *base])
    assert r.exit_code == 0 and "revoked" in r.stdout
    with api.client(token) as c:
        assert c.get("/v1/messages").status_code == 401
    r = runner.invoke(cli_app, ["token", "create", "--scope", "export", *base])
    assert r.exit_code == 2  # neither --customer nor --all
    r = runner.invoke(cli_app, ["token", "list", "--api", api.url, "--token", token])
    assert r.exit_code == 1 and "401" in r.output


def test_operator_token_file_is_created_once_0600_and_replaced_when_revoked(
    api: ApiServer, tmp_path: Path
) -> None:
    path = tmp_path / "data" / "operator-token"
    assert ensure_operator_token(api.auth, path) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    token = path.read_text().strip()
    with api.client(token) as c:
        assert c.get("/v1/tokens").status_code == 200
    assert ensure_operator_token(api.auth, path) is False  # still works: kept
    assert path.read_text().strip() == token
    api.auth.revoke(token.split("_")[1])
    assert ensure_operator_token(api.auth, path) is True
    assert path.read_text().strip() != token
