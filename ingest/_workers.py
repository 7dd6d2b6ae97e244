"""``--workers N``: N front-end processes sharing one port through SO_REUSEPORT (the kernel
spreads connections over them). The parent only starts, watches and stops them; each child
has its own spool subdirectory and metrics port."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

from mailmeta.config import Settings

STOP_TIMEOUT = 15.0


def _env(settings: Settings, index: int, port: int) -> dict[str, str]:
    env = settings.to_env(os.environ)
    env.update(
        MAILMETA_SMTP_PORT=str(port),
        MAILMETA_INGEST_WORKERS="1",
        MAILMETA_INGEST_WORKER_INDEX=str(index),
        MAILMETA_INGEST_REUSE_PORT="true",
        MAILMETA_TLS_SELF_SIGNED="false",  # the parent generated it once: see run_workers
    )
    return env


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(max(0.0, deadline - time.monotonic())):
            return ""
    return proc.stdout.readline()


def run_workers(settings: Settings) -> int:
    n = settings.ingest_workers
    # Port 0 means "any": pick one, since every child must bind the same.
    port = settings.smtp_port or _free_port(settings.smtp_host)
    if settings.tls_self_signed and not settings.tls_cert:
        from mailmeta.ingest._tls import self_signed

        cert, key = self_signed(settings.data_dir / "tls", socket.gethostname())
        settings = settings.model_copy(update={"tls_cert": str(cert), "tls_key": str(key)})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    children: list[subprocess.Popen[str]] = []
    try:
        for i in range(n):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mailmeta.ingest"],
                    env=_env(settings, i, port),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + 60
        for i, child in enumerate(children):
            line = _read_line(child, deadline)
            if "SMTP listening" not in line:
                print(f"mailmeta ingest: worker {i} did not start", file=sys.stderr)
                return 1
        print(f"mailmeta ingest: SMTP listening on {settings.smtp_host}:{port}", flush=True)
        print(
            f"mailmeta ingest: {n} workers, pids {' '.join(str(c.pid) for c in children)}",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            dead = [c for c in children if c.poll() is not None]
            if dead:
                print(f"mailmeta ingest: worker pid {dead[0].pid} exited", file=sys.stderr)
                return 1
        codes = _stop_all(children)
        if any(codes):
            print(f"mailmeta ingest: worker exit codes {codes}", file=sys.stderr)
            return 1
        return 0
    finally:
        _stop_all(children)


def _stop_all(children: list[subprocess.Popen[str]]) -> list[int]:
    # Every child gets SIGTERM at once (each finishes its own transactions in flight).
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    codes = []
    for child in children:
        if child.returncode is not None and child.stdout is not None and child.stdout.closed:
            codes.append(child.returncode)
            continue
        try:
            codes.append(child.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            child.kill()
            codes.append(child.wait(5))
        if child.stdout is not None:
            child.stdout.close()
    return codes
