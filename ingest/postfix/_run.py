"""The milter and the log follower as processes (``mailmeta milter`` / ``mailmeta maillog``):
settings from MAILMETA_* variables, one line on stdout once running, SIGTERM/SIGINT stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from mailmeta.config import ConfigError, Customers, Settings, load_customers
from mailmeta.ingest.postfix.maillog import MaillogFollower
from mailmeta.ingest.postfix.milter import MilterServer
from mailmeta.kafka import KafkaConfigError, check_connection

log = logging.getLogger("mailmeta.ingest.postfix")


def _run(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _setup(name: str) -> tuple[Settings, Customers] | int:
    try:
        settings = Settings()
    except ValueError as exc:
        print(f"mailmeta {name}: invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        customers = load_customers(settings.config, settings.region)
        check_connection(settings, timeout=5.0)
    except (ConfigError, KafkaConfigError) as exc:
        print(f"mailmeta {name}: {exc}", file=sys.stderr)
        return 2
    return settings, customers


async def _until_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_milter(host: str, port: int, answer_within: float) -> int:
    setup = _setup("milter")
    if isinstance(setup, int):
        return setup
    settings, customers = setup

    async def serve() -> int:
        server = MilterServer(
            settings, customers, host=host, port=port, answer_within=answer_within
        )
        try:
            await server.start()
        except OSError as exc:
            print(f"mailmeta milter: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
            return 1
        except RuntimeError as exc:  # the spool is locked by another process
            print(f"mailmeta milter: {exc}", file=sys.stderr)
            return 1
        print(f"mailmeta milter: listening on inet:{host}:{server.port}", flush=True)
        await _until_signal()
        await server.stop()
        return 0

    return _run(serve())


def run_maillog(path: Path | None, position: Path | None) -> int:
    setup = _setup("maillog")
    if isinstance(setup, int):
        return setup
    settings, customers = setup
    if path is not None and position is None:
        position = settings.data_dir / "maillog.position"
    if position is not None:
        position.parent.mkdir(parents=True, exist_ok=True)

    async def serve() -> int:
        follower = MaillogFollower(settings, customers, path=path, position=position)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, follower.stopping.set)
        try:
            task = loop.create_task(follower.run())
            print(f"mailmeta maillog: following {path or 'standard input'}", flush=True)
            await task
        except RuntimeError as exc:  # the spool is locked by another process
            print(f"mailmeta maillog: {exc}", file=sys.stderr)
            return 1
        return 0

    return _run(serve())
