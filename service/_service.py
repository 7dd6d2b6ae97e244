"""SinkService: store + consumer thread + API server, started and stopped together.

Used by ``python -m mailmeta.service`` and, in-process, by tests. In embedded mode the
process owns the chdb directory, so everything reading storage lives here.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import uvicorn

from mailmeta.api import (
    TokenAuthority,
    create_api,
    ensure_operator_token,
    export_slots,
    install_policies,
    server_config,
)
from mailmeta.config import Customers, NetworkGuard, Settings
from mailmeta.kafka import check_topic_retention
from mailmeta.policy import PolicyLog
from mailmeta.sinks import GROUP_ID, DrainState, LagMonitor, SinkConsumer, serve_metrics
from mailmeta.store import ClickHouseStore, Store
from mailmeta.webhooks import WebhookStage

log = logging.getLogger("mailmeta.sinks")


class SinkService:
    def __init__(
        self,
        settings: Settings,
        customers: Customers,
        *,
        store: Store | None = None,
        group_id: str | None = None,
        lag_check_s: float = 5.0,
    ) -> None:
        """``lag_check_s``: how often lag and the oldest unstored age are measured (only
        with settings.sink_metrics_port set)."""
        self.settings = settings
        self.customers = customers
        self._given_store = store
        self._group_id = group_id or settings.group_id(GROUP_ID)
        self.store: Store | None = None
        self.drain = DrainState(settings.partitions)
        self.consumer: SinkConsumer | None = None
        self._server: uvicorn.Server | None = None
        self._server_thread: threading.Thread | None = None
        self.auth: TokenAuthority | None = None
        self._policy_log: PolicyLog | None = None
        self._lag_check_s = lag_check_s
        self._lag: LagMonitor | None = None
        self._metrics_server: Any = None
        self.webhooks: WebhookStage | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    def start(self, timeout: float = 15.0) -> SinkService:
        """Open the store (migrated), start consuming, and return once the API accepts."""
        try:
            if self._given_store is not None:
                self.store = self._given_store
            else:
                # This region's customers only: the store refuses anyone else's events.
                retention = {c.id: c.retention_days for c in self.customers.here()}
                self.store = ClickHouseStore(
                    self.settings.resolved_dsn(),
                    retention,
                    cluster=self.settings.clickhouse_cluster,
                )
            # The customers as seen from this region: other regions' events are never stored.
            self.consumer = SinkConsumer(
                self.settings,
                self.store,
                self.drain,
                group_id=self._group_id,
                customers=self.customers,
                max_wait=self.settings.sink_max_wait_ms / 1000,
            )
            self.consumer.start()
            if self.settings.webhooks_in_service:
                # Embedded mode: the stage needs this process's store (one chdb owner).
                self.webhooks = WebhookStage(self.settings, self.store).start()
            if self.settings.sink_metrics_port:
                self._start_metrics()
            self._start_api(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.sink_metrics_port}/metrics"

    def _start_metrics(self) -> None:
        # Its own port, like the other stages' (the API's port needs tokens).
        self._metrics_server, _ = serve_metrics(
            self.settings.sink_metrics_port, self.settings.api_host
        )
        self._lag = LagMonitor(self.settings, self._group_id, self._lag_check_s).start()

    def _health(self) -> dict[str, Any]:
        consumer = self.consumer
        parts: dict[str, Any] = {}
        if consumer is not None:
            st = consumer.stats
            parts["consumer"] = {
                "state": st.state if consumer.alive or st.state != "running" else "failed",
                "rows_inserted": st.rows_inserted,
                "dead_lettered": st.dead_lettered,
                "batches": st.batches,
                "last_error": st.last_error,
            }
        return parts

    def _start_auth(self) -> TokenAuthority | None:
        """Bearer tokens (settings.api_auth), and the operator token file when asked for."""
        s = self.settings
        if not s.api_auth:
            return None
        auth = TokenAuthority(self.store, rate_per_s=s.api_rate_per_s, burst=s.api_rate_burst)
        auth.load()
        if s.operator_token_file is not None:
            ensure_operator_token(auth, s.operator_token_file)
        return auth

    def _start_api(self, timeout: float) -> None:
        assert self.store is not None
        self.auth = self._start_auth()
        settings = self.settings
        app = create_api(
            self.store,
            self.customers,
            self.drain,
            health=self._health,
            auth=self.auth,
            exports=export_slots(settings),
        )
        # `retention set` may shorten a customer below what the redacted topic keeps.
        app.state.topic_retention_check = lambda shortest: check_topic_retention(
            settings, shortest, timeout=5.0
        )
        app.state.webhook_guard = NetworkGuard.parse(settings.webhook_allow_networks)
        if self.webhooks is not None:
            app.state.webhook_wake = self.webhooks.wake
        # Redaction policies (/v1/policies): seeds the policies topic from the config.
        self._policy_log = install_policies(app, settings, self.customers, self.store)
        config = server_config(
            app, settings.api_host, settings.api_port, settings.trusted_proxy_networks
        )
        server = uvicorn.Server(config)
        self._server = server
        # In a thread uvicorn installs no signal handlers: the caller owns shutdown.
        thread = threading.Thread(target=server.run, name="mailmeta-sink-api", daemon=True)
        self._server_thread = thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(
                    f"API could not listen on {self.settings.api_host}:{self.settings.api_port}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"API not listening within {timeout}s")
            time.sleep(0.02)

    def stop(self, timeout: float = 7.0) -> bool:
        """Flush+commit, leave the group, stop the API, close ClickHouse; True if all in time."""
        deadline = time.monotonic() + timeout
        clean = True
        if self.consumer is not None:
            clean = self.consumer.stop(max(1.0, timeout - 2.0)) and clean
            self.consumer = None if not self.consumer.alive else self.consumer
        if self.webhooks is not None:
            self.webhooks.stop(max(1.0, deadline - time.monotonic()))
            self.webhooks = None
        if self._server is not None and self._server_thread is not None:
            self._server.should_exit = True
            self._server_thread.join(max(0.5, deadline - time.monotonic()))
            if self._server_thread.is_alive():
                self._server.force_exit = True
                self._server_thread.join(1.0)
                clean = False
            self._server = self._server_thread = None
        if self._lag is not None:
            self._lag.stop()
            self._lag = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self.auth is not None:
            self.auth.close()  # flushes the access log while the store is still open
            self.auth = None
        if self._policy_log is not None:
            self._policy_log.close()
            self._policy_log = None
        if self.store is not None and self._given_store is None:
            self.store.close()
        self.store = None
        return clean

    def __enter__(self) -> SinkService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
