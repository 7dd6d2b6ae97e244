"""The suite runs the API with tokens, as deployments do (issue 14.17); auth off is only
where a test says why, explicitly."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from mailmeta.api import create_api
from mailmeta.config import Settings
from mailmeta.local.process import free_port
from mailmeta.sinks import DrainState
from mailmeta.store import ClickHouseStore
from tests.api_helpers import CUSTOMERS


def test_tokens_are_on_unless_a_test_turns_them_off() -> None:
    assert "MAILMETA_API_AUTH" not in os.environ
    assert Settings().api_auth is True


def test_auth_off_makes_every_caller_the_local_operator(tmp_path: Path) -> None:
    # Auth off on purpose: `api_auth=false` is a supported setting (a trusted single-user
    # host), and this is the test of what it does.
    store = ClickHouseStore(
        f"chdb://{tmp_path / 'ch'}", {c.id: c.retention_days for c in CUSTOMERS}
    )
    try:
        app = create_api(store, CUSTOMERS, DrainState(1), auth=None)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 15
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "API did not start"
                time.sleep(0.02)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                me = c.get("/v1/me").json()
                assert me["name"] == "local-operator" and me["customer"] is None
                r = c.post("/v1/tokens", json={"customer": "acme", "scopes": ["export"]})
                assert r.status_code == 409 and "MAILMETA_API_AUTH" in r.json()["error"]
        finally:
            server.should_exit = True
            thread.join(10)
            assert not thread.is_alive(), "API did not stop"
    finally:
        store.close()
