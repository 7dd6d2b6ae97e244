"""The webhook stage process: ``python -m mailmeta.webhooks`` or ``mailmeta webhooks``.

Settings from MAILMETA_* env vars. It opens the store itself, so in embedded mode (chdb) give
it a store of its own or a ClickHouse server shared with the sink and the API
(MAILMETA_CLICKHOUSE_DSN). Prints ``mailmeta webhooks: running`` once consuming; SIGTERM or
SIGINT: stop (what is queued stays queued), exit 0. Exit 2 on a configuration error, 1 when
it cannot start or a thread dies.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

from prometheus_client import start_http_server
from pydantic import ValidationError

from mailmeta.config import ConfigError, Settings, load_customers
from mailmeta.kafka import KafkaConfigError, check_connection
from mailmeta.store import ClickHouseStore
from mailmeta.webhooks._stage import WebhookStage

log = logging.getLogger("mailmeta.webhooks")


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"mailmeta webhooks: invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        customers = load_customers(settings.config, settings.region)
        check_connection(settings, timeout=5.0)
    except (ConfigError, KafkaConfigError) as exc:
        print(f"mailmeta webhooks: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        store = ClickHouseStore(
            settings.resolved_dsn(),
            {c.id: c.retention_days for c in customers.here()},
            cluster=settings.clickhouse_cluster,
        )
    except Exception as exc:
        print(f"mailmeta webhooks: cannot open the store: {exc}", file=sys.stderr)
        return 1
    if settings.webhook_metrics_port:
        start_http_server(settings.webhook_metrics_port, settings.api_host)
    stage = WebhookStage(settings, store).start()
    print("mailmeta webhooks: running", flush=True)
    code = 0
    while not stop.wait(1.0):
        if not stage.alive:
            log.error("webhook stage stopped unexpectedly; exiting")
            code = 1
            break
    stage.stop()
    store.close()
    return code
