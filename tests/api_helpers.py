"""The query API in this process on a fresh embedded ClickHouse, with tokens on.

No broker: rows are raw events redacted by the real redactor, inserted through the store
(as the sink would insert them); the API is served by
uvicorn in a thread on a free loopback port and stopped by the fixture that started it.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from mailmeta.api import SCOPES, TokenAuthority, create_api, install_policies, server_config
from mailmeta.config import Customer, Customers, Settings
from mailmeta.local.process import free_port
from mailmeta.policy import PolicyLog
from mailmeta.sinks import DrainState
from mailmeta.store import ClickHouseStore
from tests.event_helpers import Redacted

ACME_KEY = "acme-test-hmac-key-0123456789abcdef"
CUSTOMERS = Customers(
    [
        Customer(
            id="acme",
            domains=["acme.example"],
            retention_days=60,
            hmac_key=ACME_KEY,
            policy_version=3,
            policy={
                "mail_from": "hmac",
                "rcpt_to": "hmac",
                "message_id": "keep",
                "subject": "keep",
                "smtp_reply": "keep",
                "size_bytes": "keep",
                "sender_ip": "truncate_ip",
            },
        ),
        Customer(
            id="globex",
            domains=["globex.example"],
            retention_days=90,
            policy={"mail_from": "keep", "rcpt_to": "mask", "message_id": "keep"},
        ),
    ]
)


# Rows are written the way production writes them: a raw event through the real redactor.
event = Redacted(CUSTOMERS)


class ApiServer:
    def __init__(
        self,
        tmp: Path,
        *,
        rate_per_s: float = 1000.0,
        burst: int = 1000,
        customers: Customers = CUSTOMERS,
    ) -> None:
        self.store = ClickHouseStore(
            f"chdb://{tmp / 'ch'}", {c.id: c.retention_days for c in customers}
        )
        self.chdb_dir = tmp / "ch"
        self.auth = TokenAuthority(self.store, rate_per_s=rate_per_s, burst=burst).load()
        self.app = create_api(self.store, customers, DrainState(1), auth=self.auth)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Served as the service serves it (no proxy trusted), on a loopback port of its own.
        self.server = uvicorn.Server(server_config(self.app, "127.0.0.1", self.port, []))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        _, self.operator = self.auth.create("operator", None, SCOPES)
        self.policy_log: PolicyLog | None = None

    def install_policies(self, settings: Settings, customers: Customers) -> None:
        """The policy routes on ``settings``' broker, as the service wires them."""
        self.policy_log = install_policies(self.app, settings, customers, self.store)

    def start(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert self.thread.is_alive(), "API server thread died"
            assert time.monotonic() < deadline, "API not listening within 15 s"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "API server thread did not stop"
        if self.policy_log is not None:
            self.policy_log.close()
        self.auth.close()
        self.store.close()

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def token(self, customer: str | None, *scopes: str, name: str = "t") -> str:
        with self.client(self.operator) as c:
            r = c.post("/v1/tokens", json={"name": name, "customer": customer, "scopes": scopes})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


# The browser tests drive Debian's chromium through Playwright (no browser download).
CHROMIUM = os.environ.get("MAILMETA_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def need_chromium() -> None:
    if Path(CHROMIUM).exists() or shutil.which(CHROMIUM):
        return
    message = f"{CHROMIUM} not found (make test installs Debian's chromium: tests/tools/browser.sh)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)  # CI must run the browser test, never skip it
    pytest.skip(message)


def per_table(api: ApiServer, customer: str) -> dict[str, int]:
    """Rows about ``customer`` in every table with a customer_id column (FINAL where the
    engine replaces rows, so a revoked token counts once)."""
    tables = api.store._rows(
        "SELECT table FROM system.columns WHERE database = currentDatabase() "
        "AND name = 'customer_id' AND table IN (SELECT name FROM system.tables "
        "WHERE database = currentDatabase() AND engine LIKE '%MergeTree')"
    )
    out = {}
    for (table,) in tables:
        [(n,)] = api.store._rows(
            f"SELECT count() FROM `{table}` WHERE customer_id = {{c:String}}", {"c": customer}
        )
        out[table] = int(n)
    return out
