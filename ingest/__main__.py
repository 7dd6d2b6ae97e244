"""``python -m mailmeta.ingest``: the SMTP front end as a process.

Settings come from MAILMETA_* variables. Prints one line once listening; SIGTERM/SIGINT stop
accepting, let transactions in flight finish, flush the producer and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable

from pydantic import ValidationError

from mailmeta.config import ConfigError, Customers, Settings, load_customers
from mailmeta.ingest._metrics import serve_metrics
from mailmeta.ingest._workers import run_workers
from mailmeta.ingest.server import IngestServer
from mailmeta.kafka import KafkaConfigError, check_connection

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
    try:
        server = IngestServer(settings, customers, reuse_port=settings.ingest_reuse_port)
    except ValueError as exc:  # a setting that cannot be used (e.g. the relay's CA file)
        print(f"mailmeta ingest: {exc}", file=sys.stderr)
        return 2
    try:
        await server.start()
    except OSError as exc:
        print(
            f"mailmeta ingest: cannot listen on {server.host}:{server.port}: {exc}", file=sys.stderr
        )
        return 1
    except RuntimeError as exc:  # e.g. the spool directory is locked by another process
        print(f"mailmeta ingest: {exc}", file=sys.stderr)
        return 1
    if settings.ingest_metrics_port:
        port = settings.ingest_metrics_port + settings.ingest_worker_index
        serve_metrics(port, settings.smtp_host)
        log.info("metrics on http://%s:%d/metrics", settings.smtp_host, port)
    print(f"mailmeta ingest: SMTP listening on {server.host}:{server.port}", flush=True)
    await stop.wait()
    log.info("signal received: stopping")
    await server.stop()
    return 0


# Command-line options: each sets the MAILMETA_* variable of the same meaning.
_OPTIONS = {
    "relay_to": ("--relay-to", "HOST:PORT", "next hop: relay every message there"),
    "relay_networks": ("--relay-networks", "CIDR,...", "client networks that may relay"),
    "ingest_workers": ("--workers", "N", "processes sharing the port (SO_REUSEPORT)"),
    "tls_cert": ("--tls-cert", "PEM", "certificate (chain) for STARTTLS"),
    "tls_key": ("--tls-key", "PEM", "private key for STARTTLS"),
    "ingest_metrics_port": ("--metrics-port", "PORT", "Prometheus /metrics (0 = off)"),
}


def _parse_args(argv: list[str] | None) -> dict[str, object]:
    ap = argparse.ArgumentParser(prog="python -m mailmeta.ingest", description=__doc__)
    for dest, (flag, metavar, text) in _OPTIONS.items():
        ap.add_argument(flag, dest=dest, metavar=metavar, help=text)
    ap.add_argument(
        "--tls-self-signed",
        action="store_true",
        default=None,
        help="STARTTLS with a self-signed certificate (local use)",
    )
    args = ap.parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    overrides = _parse_args(argv)
    try:
        # Options go through the same validation as the environment variables.
        env_overrides = {f"MAILMETA_{k.upper()}": str(v) for k, v in overrides.items()}
        os.environ.update(env_overrides)
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
        customers = load_customers(settings.config, settings.region)
        check_connection(settings, timeout=5.0)  # refused credentials: fail now, say which
    except (ConfigError, KafkaConfigError) as exc:
        print(f"mailmeta ingest: {exc}", file=sys.stderr)
        return 2
    if settings.ingest_workers > 1:
        return run_workers(settings)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(serve(settings, customers))


if __name__ == "__main__":
    sys.exit(main())
