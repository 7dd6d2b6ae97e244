"""``python -m mailmeta.ingest``: the SMTP front end as a process.

Settings come from MAILMETA_* variables. Prints one line once listening; SIGTERM/SIGINT stop
accepting, let transactions in flight finish, flush the producer and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from pydantic import ValidationError

from mailmeta.config import ConfigError, Customers, Settings, load_customers
from mailmeta.ingest.server import IngestServer

log = logging.getLogger("mailmeta.ingest")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def serve(settings: Settings, customers: Customers) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = IngestServer(settings, customers)
    try:
        await server.start()
    except OSError as exc:
        print(
            f"mailmeta ingest: cannot listen on {server.host}:{server.port}: {exc}", file=sys.stderr
        )
        return 1
    print(f"mailmeta ingest: SMTP listening on {server.host}:{server.port}", flush=True)
    await stop.wait()
    log.info("signal received: stopping")
    await server.stop()
    return 0


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:  # a malformed MAILMETA_* variable is a config error too
        print(f"mailmeta ingest: invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        customers = load_customers(settings.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(serve(settings, customers))


if __name__ == "__main__":
    sys.exit(main())
