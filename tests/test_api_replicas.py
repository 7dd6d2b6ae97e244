"""Two API replicas over one store (issue 16.3): tokens created or revoked through one are
honoured by the other on its very next request. Rate limits are per replica (documented).

Both replicas run in this process over the same ClickHouseStore (chdb allows one owner per
process); each has its own TokenAuthority, app and uvicorn server, as two processes would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from mailmeta.api import TokenAuthority, create_api
from mailmeta.local.process import free_port
from mailmeta.sinks import DrainState
from tests.api_helpers import CUSTOMERS, ApiServer, event


class Replica:
    """A second API over ``primary``'s store; stopped (never closing the store) by its test."""

    def __init__(self, primary: ApiServer) -> None:
        self.auth = TokenAuthority(primary.store, rate_per_s=1000.0, burst=1000).load()
        app = create_api(primary.store, CUSTOMERS, DrainState(1), auth=self.auth)
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "replica did not start"
            time.sleep(0.02)

    def get(self, path: str, token: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.get(self.url + path, headers=headers, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "replica did not stop"
        self.auth.close()


@pytest.fixture
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApiServer, Replica]]:
    primary = ApiServer(tmp_path_factory.mktemp("replicas")).start()
    primary.store.insert_events([event("acme")])
    try:
        # A token that exists before the second replica starts (loaded at its start).
        replica = Replica(primary)
        try:
            yield primary, replica
        finally:
            replica.stop()
    finally:
        primary.stop()


def test_revocation_on_one_replica_holds_on_the_other_at_once(
    replicas: tuple[ApiServer, Replica],
) -> None:
    a, b = replicas
    token = a.token("acme", "messages:read")  # created through A after B started
    token_id = token.split("_")[1]
    assert b.get("/v1/me", token).status_code == 200
    assert b.get("/v1/me", token).status_code == 200  # B's memoised path
    with a.client(a.operator) as op:
        assert op.delete(f"/v1/tokens/{token_id}").status_code == 200
    r = b.get("/v1/messages", token)
    assert r.status_code == 401 and "messages" not in r.json()

    # And the other way round: revoked through B, refused by A on its next request.
    other = a.token("acme", "messages:read")
    with a.client(other) as c:
        assert c.get("/v1/me").status_code == 200
    assert b.get("/v1/me", other).status_code == 200
    r = httpx.delete(
        f"{b.url}/v1/tokens/{other.split('_')[1]}",
        headers={"Authorization": f"Bearer {a.operator}"},
        timeout=30,
    )
    assert r.status_code == 200
    with a.client(other) as c:
        assert c.get("/v1/me").status_code == 401


def test_a_token_present_when_both_started_is_refused_by_b_once_revoked_on_a(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    a = ApiServer(tmp_path_factory.mktemp("replicas2")).start()
    try:
        _, token = a.auth.create("early", "acme", {"messages:read"})
        b = Replica(a)  # loads the token at start, as a long-running replica would have it
        try:
            assert b.get("/v1/me", token).status_code == 200
            with a.client(a.operator) as op:
                assert op.delete(f"/v1/tokens/{token.split('_')[1]}").status_code == 200
            assert b.get("/v1/me", token).status_code == 401
        finally:
            b.stop()
    finally:
        a.stop()
