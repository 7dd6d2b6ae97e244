"""The brokers a benchmark can run on, started on 127.0.0.1 and stopped by PID.

``kafka``: a single-node Apache Kafka (KRaft) configured as ``mailmeta up`` runs it (the node of
:func:`mailmeta.local.supervisor.local_kafka`: durable log in the data dir, the default JVM
options with the C1-only JIT), or with ``jvm="throughput"`` the full JIT
(:data:`~mailmeta.local.apache_kafka.THROUGHPUT_JVM_OPTS`) for the broker's peak throughput.
``tansu`` (memory-only) and ``noida`` (noida-db) are the bundled toy brokers.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from mailmeta.local.apache_kafka import THROUGHPUT_JVM_OPTS
from mailmeta.local.brokers import Broker, LocalBroker
from mailmeta.local.process import free_port
from mailmeta.local.supervisor import local_kafka

KINDS = ("kafka", "tansu", "noida")
JVM_CHOICES = ("up", "throughput")


def parse_kinds(text: str, allowed: tuple[str, ...] = KINDS) -> list[str]:
    """``"kafka,tansu"`` -> ``["kafka", "tansu"]``; an unknown or repeated name is an error."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in allowed]
    if not kinds or bad or len(set(kinds)) != len(kinds):
        raise ValueError(f"brokers must be distinct names from {', '.join(allowed)}; got {text!r}")
    return kinds


class BenchBroker:
    """One broker of ``kind`` in ``base_dir``; a context manager (stop is by PID, bounded)."""

    def __init__(self, kind: str, base_dir: Path, *, jvm: str = "up") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown broker {kind!r}; expected one of {', '.join(KINDS)}")
        if jvm not in JVM_CHOICES:
            raise ValueError(f"unknown JVM choice {jvm!r}; expected one of {JVM_CHOICES}")
        self.kind = kind
        self.base_dir = base_dir
        self.jvm = jvm
        self._broker: Broker | None = None

    @property
    def label(self) -> str:
        if self.kind == "kafka":
            jit = "full JIT" if self.jvm == "throughput" else "as `mailmeta up` runs it"
            return f"Apache Kafka (single node, {jit})"
        return {"tansu": "Tansu (memory-only)", "noida": "noida-db"}[self.kind]

    def start(self) -> BenchBroker:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        broker: Broker
        if self.kind == "kafka":
            node = local_kafka(self.base_dir / "kafka", free_port())
            if self.jvm == "throughput":
                node.jvm_opts = list(THROUGHPUT_JVM_OPTS)
            broker = node
        else:
            data = self.base_dir / "noida" if self.kind == "noida" else None
            broker = LocalBroker(
                self.kind,  # type: ignore[arg-type]
                free_port(),
                data_dir=data,
                log_path=self.base_dir / f"{self.kind}.log",
            )
        broker.start(timeout=120)
        self._broker = broker
        return self

    @property
    def bootstrap(self) -> str:
        assert self._broker is not None, "broker not started"
        return self._broker.bootstrap

    @property
    def pid(self) -> int | None:
        return self._broker.pid if self._broker is not None else None

    def stop(self) -> None:
        if self._broker is not None:
            self._broker.stop(30)

    def __enter__(self) -> BenchBroker:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
