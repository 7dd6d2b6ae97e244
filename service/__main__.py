"""``python -m mailmeta.service``: the sink process (settings from MAILMETA_* env vars).

Stores redacted events in ClickHouse and serves the query API. Prints one line,
``mailmeta sink: API listening on http://HOST:PORT``, once the API accepts requests. SIGTERM
or SIGINT: insert and commit what is held, stop, close ClickHouse, exit 0. Exit 2 on a
configuration error, 1 when it cannot start or the consumer dies.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType

from pydantic import ValidationError

from mailmeta.config import ConfigError, Settings, load_customers
from mailmeta.kafka import KafkaConfigError, check_connection
from mailmeta.service._service import SinkService

log = logging.getLogger("mailmeta.sinks")


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"mailmeta sink: invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        customers = load_customers(settings.config, settings.region)
        check_connection(settings, timeout=5.0)  # refused credentials: fail now, say which
    except (ConfigError, KafkaConfigError) as exc:
        print(f"mailmeta sink: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    # Before anything starts, so a signal during start-up still ends in a clean stop.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    service = SinkService(settings, customers)
    try:
        service.start()
    except Exception as exc:
        print(f"mailmeta sink: cannot start: {exc}", file=sys.stderr)
        return 1
    print(f"mailmeta sink: API listening on {service.url}", flush=True)

    code = 0
    while not stop.wait(1.0):
        if service.consumer is not None and not service.consumer.alive:
            # Exit so a supervisor restarts us; /healthz has said why meanwhile.
            log.error("sink consumer stopped unexpectedly; exiting")
            code = 1
            break
    if not service.stop():
        log.warning("shutdown did not finish cleanly in time")
    return code


if __name__ == "__main__":
    sys.exit(main())
